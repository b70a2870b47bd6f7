"""The public entry point: ``Engine.load(path)`` and what a program does with a model."""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from .backends import get_backend
from .text.chat_template import ChatTemplate, ChatTemplateError
from .models.config import ModelConfig
from .cpu import jit
from .errors import ModelFileError
from .generate import GenerationResponse, GenerationStats, sampler_for, stream_generate
from .gguf.file import GGUFFile
from .gguf.quants import nonfinite
from .models import build_model
from .params import GenerationParams, ParamError
from .text import grammar
from .text import tools as tool_calls
from .text.tokenizer import Tokenizer
from .text.tokenizer import compiled as tokenizer_compiled

#: on the CPU, prompts are evaluated in chunks of this many tokens. It bounds prefill's scratch
#: memory: the MLP activations (3 x chunk x d_ff float32) and attention scores (heads x chunk x
#: context). Measured on Qwen2.5-1.5B Q4_K_M, 2 threads: 64 instead of 256 lowers the peak RSS by
#: 10 MiB for a 128-token prompt and 33 MiB for 512 tokens at the same prefill speed (each chunk
#: streams the weights once; the int8 kernels are compute-bound); 32 costs ~15 % of prefill speed.
PREFILL_CHUNK = 64
#: the span one forward takes on the NPU backends: the backend cuts it into its own chunks
#: (``GRAPH_CHUNK_TOKENS``) and runs their products as a graph, one SUBMIT for the same stage of
#: every chunk of a layer, so a longer span costs no more SUBMITs (docs/npu.md)
PREFILL_CHUNK_NPU = 512


def _merged(params: GenerationParams | None, overrides: dict) -> GenerationParams:
    """``params`` with ``overrides`` applied (validated again), or the overrides alone."""
    if params is None:
        return GenerationParams(**overrides)
    return params.replace(**overrides) if overrides else params


def _int_arg(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ParamError(name, f"must be an integer, got {value!r}", "invalid_type")
    if value < minimum:
        raise ParamError(name, f"must be >= {minimum}, got {value}")


class Engine:
    """A loaded model: weights, KV cache, tokenizer, chat template.

    >>> engine = Engine.load("qwen2.5-1.5b-instruct-q4_k_m.gguf")
    >>> engine.generate("The capital of France is", max_new_tokens=16, temperature=0)
    >>> for piece in engine.stream_chat([{"role": "user", "content": "Hi!"}]):
    ...     print(piece, end="", flush=True)
    >>> for r in engine.responses("Once upon a time", max_new_tokens=8, logprobs=True):
    ...     print(r.token, r.logprob, repr(r.text), r.finish_reason)
    """

    def __init__(self, gguf: GGUFFile, config: ModelConfig, model, device: str, n_ctx: int,
                 tokenizer: Tokenizer | None = None, template: ChatTemplate | ModelFileError | None = None):
        self.gguf = gguf
        self.path = gguf.path
        self.config = config
        self.model = model
        self.device = device
        self.n_ctx = n_ctx
        self.cache = model.new_cache()
        self.tokenizer = tokenizer
        self.template = template
        self.stats = GenerationStats()
        self._context: list[int] = []       # the tokens whose keys/values are in the cache
        self.prefill_chunk = PREFILL_CHUNK if device == "cpu" else PREFILL_CHUNK_NPU

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", n_ctx: int = 4096,
             threads: int | None = None, progress=None, npu_min_rows: int | None = None,
             warm_up: bool = True) -> "Engine":
        """Open a GGUF model. ``progress(done, total, what)`` is called while weights are prepared,
        and with ``what`` = "compiling NAME" whenever numba compiles a function.

        ``warm_up``: run one token through the model before returning, so that numba's
        compilation (tens of seconds on a first run, ~0.1 s to read its cache afterwards) happens
        here and never inside the timings of an answer.

        ``device``: "cpu", "npu" (the rocket NPU; an error if there is none), "npu-sim" (its
        simulator) or "auto" (the NPU if present, else the CPU with a notice on stderr).
        ``npu_min_rows``: with an NPU, matmuls with fewer rows (decode) run on the CPU; 0 sends
        every matmul to the NPU (default: ``backends.npu.DEFAULT_MIN_ROWS``)."""
        _int_arg("n_ctx", n_ctx, 1)
        if threads is not None:
            _int_arg("threads", threads, 1)
        if npu_min_rows is not None:
            _int_arg("npu_min_rows", npu_min_rows, 0)
        if not isinstance(device, str):
            raise ParamError("device", f"must be a string, got {device!r}", "invalid_type")
        g = GGUFFile(path)
        cfg = ModelConfig.from_gguf(g)
        n_ctx = min(n_ctx, cfg.context_length)
        md = g.raw_metadata     # vocabulary and merges as views of the file, not lists of str
        has_tokenizer = "tokenizer.ggml.tokens" in md
        # A first run compiles the tokenizer's kernels (~4 s) and the step's parallel region (~2 s)
        # in a second process while this one builds the model and compiles the step; the tokenizer
        # is built after the model, from the cache.
        helper = None
        if warm_up and has_tokenizer and jit.Helper.useful() and not tokenizer_compiled(md):
            helper = jit.Helper("rosenblatt.text.tokenizer:precompile", os.fspath(g.path))
        try:
            backend = get_backend(device, threads=threads, npu_min_rows=npu_min_rows)
            model = build_model(g, cfg, backend, n_ctx, progress=progress)
            engine = cls(g, cfg, model, backend.name, n_ctx)   # "auto" resolved
            if warm_up:
                with jit.helping(helper, engine._compile_report(progress)):
                    engine._warm_model(progress)
            if helper is not None:
                if progress and helper.running:
                    progress(0, 0, "compiling tokenizer (in a second process)")
                helper.finish()
        finally:
            if helper is not None:
                helper.stop()
        if has_tokenizer:
            engine.tokenizer = Tokenizer.from_metadata(md, g.path)
            try:
                engine.template = ChatTemplate.from_metadata(md, engine.tokenizer)
            except ChatTemplateError as e:   # the model still runs; chat() reports this when used
                engine.template = ModelFileError(g.path, "metadata 'tokenizer.chat_template'", str(e))
        del md
        g.evict_metadata_pages()    # parsed; the few token texts read later come back from the file
        if warm_up:
            engine._warm_tokenizer(progress)
        return engine

    @staticmethod
    def _compile_report(progress):
        return (lambda name: progress(0, 0, f"compiling {name}")) if progress else (lambda name: None)

    def _warm_model(self, progress=None) -> None:
        with jit.compiling(self._compile_report(progress)):
            self.eval([0], logits="last")
        self.reset()

    def _warm_tokenizer(self, progress=None) -> None:
        if self.tokenizer is not None:
            with jit.compiling(self._compile_report(progress)):
                self.tokenizer.encode("Hello", add_special=False)

    def warm_up(self, progress=None) -> None:
        """Compile (or read back from numba's cache) what generation runs: one token through the
        model (then an empty context again) and the tokenizer's encoder on a word."""
        self._warm_model(progress)
        self._warm_tokenizer(progress)

    def _check_tokens(self, token_ids, name: str = "token_ids") -> np.ndarray:
        """Token ids as int64, or a :class:`ParamError` naming ``name``: a sequence (or 1-D integer
        array) of integers inside the vocabulary; bools, floats and strings are refused, not cast."""
        vocab = self.config.vocab_size
        if isinstance(token_ids, np.ndarray):
            if token_ids.ndim != 1 or token_ids.dtype.kind not in "iu":
                raise ParamError(name, f"must be a 1-D array of integer token ids, got {token_ids.dtype} "
                                 f"with shape {token_ids.shape}", "invalid_type")
            values = token_ids
        elif isinstance(token_ids, Sequence) and not isinstance(token_ids, (str, bytes)):
            for t in token_ids:
                if isinstance(t, (bool, np.bool_)) or not isinstance(t, numbers.Integral):
                    raise ParamError(name, f"token ids are integers, got {t!r}", "invalid_type")
            values = token_ids
        else:
            raise ParamError(name, f"must be a list of token ids, got {type(token_ids).__name__}", "invalid_type")
        bad = next((int(t) for t in values if not 0 <= int(t) < vocab), None)
        if bad is not None:
            raise ParamError(name, f"token id {bad} is outside the vocabulary [0, {vocab}) of "
                             f"{os.path.basename(self.path)}")
        return np.asarray(values, dtype=np.int64)

    def check_logits(self, out: np.ndarray, start: int) -> None:
        """Non-finite logits come from a weight with NaN or infinite values: name it."""
        if np.isfinite(out).all():
            return
        g = self.gguf
        bad = next((n for n, t in g.tensors.items() if nonfinite(int(t.qtype), t.data)), None)
        self.reset()
        if bad is not None:
            raise ModelFileError(self.path, f"tensor {bad!r}", "holds NaN or infinite values (the logits are not finite)")
        raise ModelFileError(self.path, "weights", f"the forward's logits are not finite from position {start} "
                             "(every tensor's stored values are finite: an overflow)")

    def eval(self, token_ids: Sequence[int], logits: str = "last") -> np.ndarray | None:
        """Append ``token_ids`` to the context (KV cache) and return logits ("all", "last" or "none")."""
        ids = self._check_tokens(token_ids)
        if self.cache.length + len(ids) > self.n_ctx:
            raise ValueError(f"context overflow: {self.cache.length} + {len(ids)} tokens > n_ctx {self.n_ctx}")
        parts = []
        step = self.prefill_chunk
        for s in range(0, len(ids), step):
            chunk = ids[s:s + step]
            last = s + step >= len(ids)
            mode = logits if (logits == "all" or last) else "none"
            start = self.cache.length
            out = self.model.forward(chunk, self.cache, logits=mode)
            if out is not None:
                self.check_logits(out, start)
                parts.append(out)
        if logits == "none" or not parts:
            return None
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits after every position of ``token_ids``, [len, vocab] float32, in a fresh context."""
        ids = self._check_tokens(token_ids)
        self.reset()
        if ids.size == 0:
            return np.zeros((0, self.config.vocab_size), dtype=np.float32)
        out = self.eval(ids, logits="all")
        self._context = ids.tolist()
        return out

    def reset(self) -> None:
        self.cache.reset()
        self._context = []

    def truncate(self, length: int) -> None:
        self.cache.truncate(length)
        del self._context[length:]

    # -- text ------------------------------------------------------------------------------
    def _tok(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ModelFileError(self.path, "metadata 'tokenizer.ggml.tokens'", "missing: this GGUF has no tokenizer")
        return self.tokenizer

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of ``text``; special-token text such as ``<|im_start|>`` is parsed, as llama.cpp does."""
        if not isinstance(text, str):
            raise ParamError("text", f"must be a string, got {type(text).__name__}", "invalid_type")
        return self._tok().encode(text, add_special=add_special, parse_special=True)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok().decode(self._check_tokens(ids, "ids").tolist())

    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = True,
                            tools: Sequence[Mapping] | None = None) -> str:
        """The prompt text of ``messages``. With ``tools`` (OpenAI's function list), or messages
        holding tool calls and answers, the conversation goes through :mod:`rosenblatt.text.tools`:
        the template's own tool support if it has one, else a description in the system message."""
        self._tok()
        if isinstance(self.template, Exception):
            raise self.template
        if tools or any(isinstance(m, Mapping) and (m.get("tool_calls") or m.get("role") == "tool") for m in messages):
            checked = tool_calls.check_tools(list(tools or []))
            # the template's own tool support only where it teaches this syntax (Qwen2.5's, Hermes's)
            messages, tools = tool_calls.render_messages(messages, checked, tool_calls.OPEN in self.template.source)
        return self.template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)

    def prefill(self, ids: Sequence[int], stats: GenerationStats | None = None) -> np.ndarray:
        """Bring the cache to exactly ``ids`` reusing the longest common prefix; logits of the
        last token. ``stats.cached_tokens`` gets the reused length."""
        ids = [int(t) for t in ids]
        n = 0
        limit = min(len(ids) - 1, len(self._context))   # re-evaluate at least the last token
        while n < limit and self._context[n] == ids[n]:
            n += 1
        n = self.cache.reusable(n)      # a sliding-window cache may have dropped what resuming at n needs
        self.truncate(n)
        # The last prompt token is evaluated on its own, like a decode step: the same prompt then
        # gives the same first logits whether its prefix came from the cache or not (a batch and
        # a single row may use different kernels, and int8 activation rounding amplifies 1e-6).
        if n < len(ids) - 1:
            self.eval(ids[n:-1], logits="none")
        logits = self.eval(ids[-1:], logits="last")[0]
        self._context = list(ids)
        if stats is not None:
            stats.cached_tokens = n
        return logits

    def decode(self, token: int) -> np.ndarray:
        """One generated token into the context: its logits (one decode step)."""
        logits = self.eval([token], logits="last")[0]
        self._context.append(int(token))
        return logits

    def responses(self, prompt: str | Sequence[int], params: GenerationParams | None = None, *,
                  add_special: bool = True, **overrides) -> Iterator[GenerationResponse]:
        """Continue ``prompt`` (text, or token ids): one :class:`GenerationResponse` per generated
        token (its text piece, id, log-probability with ``logprobs``, running stats), then a last
        one with the finish reason (see :func:`rosenblatt.generate.stream_generate`).

        ``params`` is a :class:`~rosenblatt.params.GenerationParams`; its fields may also be given
        (or overridden) as keywords: ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``,
        ``min_p``, ``repeat_penalty``, ``repeat_last_n``, ``seed``, ``stop``, ``ignore_eos``,
        ``logprobs`` (defaults, ranges and meaning in :mod:`rosenblatt.params`; a bad one raises
        :class:`~rosenblatt.params.ParamError` naming it). Stops at an end-of-generation token, at
        any of the ``stop`` strings (not included in the output) or after ``max_new_tokens``.
        """
        return self._stream(*self.prepare(prompt, params, add_special=add_special, **overrides))

    def _stream(self, ids: list[int], p: GenerationParams) -> Iterator[GenerationResponse]:
        return stream_generate(self, ids, sampler_for(self.tokenizer, p), p.max_new_tokens, p.stop, p.ignore_eos, p.logprobs,
                               p.top_logprobs)

    def prepare(self, prompt: str | Sequence[int], params: GenerationParams | None = None, *,
                add_special: bool = True, **overrides) -> tuple[list[int], GenerationParams]:
        """The prompt's token ids and the parameters of a generation, checked: the prompt is not
        empty, fits the context, and ``max_new_tokens`` is capped to the room left (what
        :meth:`responses` and the server's batch generator start from)."""
        p = _merged(params, overrides)
        if not isinstance(p, GenerationParams):
            raise TypeError(f"params must be a GenerationParams, got {type(p).__name__}")
        bad = [t for t in p.logit_bias if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ParamError("logit_bias", f"token id {bad[0]} is outside the vocabulary [0, "
                             f"{self.config.vocab_size}) of {os.path.basename(self.path)}")
        tok = self._tok()
        ids = tok.encode(prompt, add_special=add_special, parse_special=True) if isinstance(prompt, str) \
            else self._check_tokens(prompt, "prompt").tolist()
        if not ids:
            raise ParamError("prompt", f"is empty (no tokens for {os.path.basename(self.path)})")
        grammar.compile_grammar(tok, p)             # a bad schema or grammar is refused here
        if len(ids) + p.max_new_tokens > self.n_ctx:
            if len(ids) >= self.n_ctx:
                raise ValueError(f"the prompt has {len(ids)} tokens; the context holds {self.n_ctx}")
            p = p.replace(max_new_tokens=self.n_ctx - len(ids))
        return ids, p

    def prepare_chat(self, messages: Sequence[Mapping], params: GenerationParams | None = None,
                     tools: Sequence[Mapping] | None = None, **overrides) -> tuple[list[int], GenerationParams]:
        """:meth:`prepare` for a conversation (and the ``tools`` it may call, see
        :meth:`apply_chat_template`): the chat template rendered, its stop strings added."""
        text = self.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
        p = _merged(params, overrides)
        stops = p.stop + tuple(s for s in self.template.stop_strings if s not in p.stop)
        return self.prepare(text, p.replace(stop=stops), add_special=False)


    def stream(self, prompt: str | Sequence[int], params: GenerationParams | None = None, **kwargs) -> Iterator[str]:
        """Continue ``prompt``, yielding only the text pieces (parameters: :meth:`responses`)."""
        return (r.text for r in self.responses(prompt, params, **kwargs) if r.text)

    def generate(self, prompt: str | Sequence[int], params: GenerationParams | None = None, **kwargs) -> str:
        """The whole continuation of ``prompt`` as one string (parameters: :meth:`responses`)."""
        return "".join(self.stream(prompt, params, **kwargs))

    def chat_responses(self, messages: Sequence[Mapping], params: GenerationParams | None = None,
                       **overrides) -> Iterator[GenerationResponse]:
        """Render ``messages`` with the model's chat template and generate the assistant's answer
        (responses and parameters as :meth:`responses`; the template's own stop strings added)."""
        return self._stream(*self.prepare_chat(messages, params, **overrides))

    def stream_chat(self, messages: Sequence[Mapping], params: GenerationParams | None = None,
                    **kwargs) -> Iterator[str]:
        """Render ``messages`` with the model's chat template and stream the assistant's answer."""
        return (r.text for r in self.chat_responses(messages, params, **kwargs) if r.text)

    def chat(self, messages: Sequence[Mapping], params: GenerationParams | None = None, **kwargs) -> str:
        return "".join(self.stream_chat(messages, params, **kwargs))

    def scheduler(self, parallel: int = 4):
        """A :class:`~rosenblatt.scheduler.Scheduler`: generations from several threads at once,
        batched (each gets the tokens it would get alone). Use it as a context manager."""
        from .scheduler import Scheduler
        return Scheduler(self, parallel)

    def __repr__(self) -> str:
        c = self.config
        return f"Engine({os.path.basename(self.path)!r}, arch={c.arch}, layers={c.n_layers}, device={self.device})"


__all__ = ["Engine", "GenerationResponse", "GenerationStats", "ModelFileError"]
