"""GGUF tokenizer metadata → token ids and back, with llama.cpp's semantics.

The vocabulary, merges, scores and token types of a GGUF file (``tokenizer.ggml.*``) drive
llama.cpp's two BPE loops, implemented over numpy arrays in :mod:`rosenblatt.text.bpe` (the token
texts stay the GGUF's bytes; hash tables map text -> id and merge pair -> rank). Only the
pre-tokenizer's regex split runs in Hugging Face ``tokenizers`` (its regexes need Unicode
classes such as ``\\p{L}``). Everything follows llama.cpp's ``llama-vocab.cpp`` so that the ids
match llama.cpp's ``llama_tokenize`` exactly:

* **Pre-tokenizer.** ``tokenizer.ggml.pre`` names a list of split regexes that are applied one
  after the other (each piece of the previous split is split again, matches and gaps both kept).
  The table :data:`PRE_TOKENIZERS` holds the regexes of the supported names. An unknown name is a
  :class:`ModelFileError` (a wrong split would silently produce different ids); a missing key
  falls back to llama.cpp's ``default`` regexes with a warning, as llama.cpp does.
* **Special tokens.** Tokens typed CONTROL, USER_DEFINED or UNKNOWN are cut out of the text
  before the BPE runs, longest token text first (llama.cpp's ``tokenizer_st_partition``), and each
  occurrence becomes its id. With ``parse_special=False`` CONTROL and UNKNOWN tokens are *not*
  cut out (their text is tokenized like any other text) but USER_DEFINED tokens still are.
* **BOS/EOS.** ``add_special=True`` prepends BOS / appends EOS when ``tokenizer.ggml.add_bos_token``
  / ``add_eos_token`` say so (llama.cpp's per-pre-tokenizer defaults apply when the keys are absent).
* **End of generation.** :attr:`Tokenizer.eog_ids` is collected the way llama.cpp does it: EOS,
  EOT, EOM, the FIM pad/repo/file-separator tokens, and every token whose text is one of the
  well-known end markers (``<|im_end|>``, ``<|endoftext|>``, ``<|eot_id|>``, ``<end_of_turn>``, ...).
  llama.cpp also forces such tokens to CONTROL, which matters for ``parse_special=False``.
* **No Unicode normalization** is applied (llama.cpp does none for BPE vocabularies).

Decoding concatenates the per-token pieces (llama.cpp's ``token_to_piece``): NORMAL tokens are
mapped back from the byte-level alphabet to bytes, CONTROL / UNKNOWN / USER_DEFINED tokens are
rendered as their text (CONTROL and UNKNOWN only when special tokens are rendered), UNUSED tokens
render as nothing. The bytes are then decoded as UTF-8 with U+FFFD for invalid sequences. No
"clean-up of tokenization spaces" is done, so ``decode`` equals the streamed text.

Two tokenizer models are implemented, each a :class:`_TextModel` registered in
:data:`_MODEL_BUILDERS`:

* ``gpt2``: byte-level BPE with the GGUF's merges and the pre-tokenizer regexes above. A byte
  whose byte-level character is not a token is left out of the output, as in llama.cpp (where it
  also never merges with its neighbours).
* ``llama``: SentencePiece-style BPE over token scores (llama.cpp's SPM tokenizer; gemma3, Llama 2).
  No pre-tokenizer: a whole special-token-free fragment is one word, spaces become ``▁`` (U+2581),
  a ``▁`` is prepended to the first fragment and to every fragment after a special token when
  ``tokenizer.ggml.add_space_prefix`` says so (default true), characters without a token become
  their ``<0xXX>`` byte tokens. Decoding turns ``▁`` back into spaces. BOS defaults to on, and the
  BOS/EOS/UNK ids to 1/2/0, when the GGUF does not set them (llama.cpp's SPM defaults).

One departure from llama.cpp, for malformed vocabularies only: a gpt2 merge whose parts or result
are not tokens is dropped with a warning (llama.cpp would apply it and then could not give the
result an id).
"""

from __future__ import annotations

import codecs
import os
import re
import warnings
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from itertools import chain
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from tokenizers import PreTokenizedString, Regex
from tokenizers import pre_tokenizers as _hf_pre

from .bpe import BYTE_TO_CHAR, KERNELS, ByteLevelBPE, ByteVocab, SentencePieceBPE, pack_strings
from ..cpu import jit
from ..errors import ModelFileError
from ..gguf.file import StringArray

# --------------------------------------------------------------------------------------------
# GGUF keys
# --------------------------------------------------------------------------------------------

KEY_MODEL = "tokenizer.ggml.model"
KEY_PRE = "tokenizer.ggml.pre"
KEY_TOKENS = "tokenizer.ggml.tokens"
KEY_TOKEN_TYPE = "tokenizer.ggml.token_type"
KEY_MERGES = "tokenizer.ggml.merges"
KEY_ADD_BOS = "tokenizer.ggml.add_bos_token"
KEY_ADD_EOS = "tokenizer.ggml.add_eos_token"

_ID_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "eot": "tokenizer.ggml.eot_token_id",
    "eom": "tokenizer.ggml.eom_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "fim_pad": "tokenizer.ggml.fim_pad_token_id",
    "fim_rep": "tokenizer.ggml.fim_rep_token_id",
    "fim_sep": "tokenizer.ggml.fim_sep_token_id",
}


class TokenType(IntEnum):
    """Values of ``tokenizer.ggml.token_type`` (gguf / llama.cpp ``llama_token_type``)."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


class TokenAttr(IntFlag):
    """Per-token attributes as llama.cpp keeps them (a token can gain CONTROL or UNUSED on load)."""

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5


_TYPE_TO_ATTR = {
    TokenType.UNKNOWN: TokenAttr.UNKNOWN,
    TokenType.UNUSED: TokenAttr.UNUSED,
    TokenType.NORMAL: TokenAttr.NORMAL,
    TokenType.CONTROL: TokenAttr.CONTROL,
    TokenType.USER_DEFINED: TokenAttr.USER_DEFINED,
    TokenType.BYTE: TokenAttr.BYTE,
}

_A_UNKNOWN = int(TokenAttr.UNKNOWN)
_A_UNUSED = int(TokenAttr.UNUSED)
_A_NORMAL = int(TokenAttr.NORMAL)
_A_CONTROL = int(TokenAttr.CONTROL)
_A_USER_DEFINED = int(TokenAttr.USER_DEFINED)
_A_BYTE = int(TokenAttr.BYTE)
_A_SPECIAL = _A_UNKNOWN | _A_CONTROL          # hidden unless special tokens are rendered
_A_PARTITION = _A_CONTROL | _A_USER_DEFINED | _A_UNKNOWN   # cut out of the text before BPE

KEY_SCORES = "tokenizer.ggml.scores"
KEY_ADD_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"

# --------------------------------------------------------------------------------------------
# Pre-tokenizers (split regexes per ``tokenizer.ggml.pre``, as in llama.cpp's llm_tokenizer_bpe)
# --------------------------------------------------------------------------------------------

_RE_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama3 / qwen2: the tokenizer.json regexes with "(?i:'s|...)" spelled out as ASCII case pairs,
# as llama.cpp does (a case-insensitive group would also match e.g. "'ſ" through Unicode folding).
_RE_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_RE_LLAMA3 = (_RE_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_QWEN2 = (_RE_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    """How a ``tokenizer.ggml.pre`` value splits text before BPE.

    ``regexes`` are applied in order, each to every piece left by the previous one;
    ``ignore_merges``: a piece that is itself a vocabulary token is emitted whole (llama3);
    ``add_bos``: llama.cpp's default for ``add_bos_token`` when the GGUF does not set it.
    """

    regexes: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


_PRE_DEFAULT = PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _RE_GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))
_PRE_GPT2 = PreTokenizer((_RE_GPT2,))
_PRE_STARCODER = PreTokenizer((r"\p{N}", _RE_GPT2))
_PRE_QWEN2 = PreTokenizer((_RE_QWEN2,))
_PRE_LLAMA3 = PreTokenizer((_RE_LLAMA3,), ignore_merges=True, add_bos=True)
_PRE_LLAMA3_REGEX_ONLY = PreTokenizer((_RE_LLAMA3,))

#: ``tokenizer.ggml.pre`` value → pre-tokenizer. Names map as in llama.cpp's vocabulary loader.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _PRE_DEFAULT,
    # GPT-2 regex alone
    "gpt-2": _PRE_GPT2, "phi-2": _PRE_GPT2, "mpt": _PRE_GPT2, "olmo": _PRE_GPT2, "jais": _PRE_GPT2,
    # single digits, then the GPT-2 regex
    "smollm": _PRE_STARCODER, "starcoder": _PRE_STARCODER, "refact": _PRE_STARCODER,
    "command-r": _PRE_STARCODER, "codeshell": _PRE_STARCODER, "exaone": _PRE_STARCODER,
    "minerva-7b": _PRE_STARCODER,
    # Qwen2 regex (llama3's with single digits)
    "qwen2": _PRE_QWEN2, "deepseek-r1-qwen": _PRE_QWEN2, "stablelm2": _PRE_QWEN2, "megrez": _PRE_QWEN2,
    # llama3 regex; the llama3 family also ignores merges for whole-token pieces and adds BOS
    "llama3": _PRE_LLAMA3, "llama-v3": _PRE_LLAMA3, "llama-bpe": _PRE_LLAMA3, "falcon3": _PRE_LLAMA3,
    "dbrx": _PRE_LLAMA3_REGEX_ONLY, "smaug-bpe": _PRE_LLAMA3_REGEX_ONLY,
}

# --------------------------------------------------------------------------------------------
# Tokens llama.cpp recognises by their text (llama-vocab.cpp, "auto-detect special tokens by text")
# --------------------------------------------------------------------------------------------

_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_PAD_TEXTS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>")
_FIM_REP_TEXTS = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
_FIM_SEP_TEXTS = ("<|file_sep|>",)
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
              "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>",
              "<end_of_utterance>", "<\uff5cend\u2581of\u2581sentence\uff5c>")


# --------------------------------------------------------------------------------------------
# Text models (the part that turns a special-token-free piece of text into ids)
# --------------------------------------------------------------------------------------------

_BYTE_TO_CHAR = BYTE_TO_CHAR     # byte value -> its character in the byte-level alphabet
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class _TextModel:
    """Interface of a tokenizer model type (byte-level BPE, SentencePiece BPE)."""

    #: prepended to a text fragment at the start and after a special token (SPM ``add_space_prefix``)
    space_prefix: str = ""
    #: special-token ids used when the GGUF has no ``tokenizer.ggml.*_token_id`` key for them
    default_ids: Mapping[str, int] = {}
    #: the vocabulary's unknown token (set by the Tokenizer once it has read the special ids)
    unk_id: int | None = None

    def encode_fragments(self, texts: Sequence[str]) -> list[list[int]]:  # pragma: no cover - interface
        """The ids of each text (none contains a special-token occurrence), in one pass."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, which contains no special-token occurrences."""
        return self.encode_fragments([text])[0]

    def normal_piece(self, token_text: str) -> bytes:  # pragma: no cover - interface
        """The bytes a NORMAL token stands for."""
        raise NotImplementedError

    def split(self, text: str) -> list[str]:  # pragma: no cover - interface
        """The pre-tokenizer's pieces of ``text`` (for inspection and tests)."""
        raise NotImplementedError


class _ByteLevelBPE(_TextModel):
    """``tokenizer.ggml.model = gpt2``: the pre-tokenizer's regexes (Hugging Face ``tokenizers``),
    then byte-level BPE of each piece (:class:`rosenblatt.text.bpe.ByteLevelBPE`)."""

    def __init__(self, bpe: ByteLevelBPE, pre: PreTokenizer):
        self._bpe = bpe
        self._pre = _hf_pre.Sequence([_hf_pre.Split(Regex(rx), behavior="isolated", invert=False)
                                      for rx in pre.regexes])

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any], tokens: Sequence[str], vocab: ByteVocab,
                      path: str | None) -> tuple["_ByteLevelBPE", PreTokenizer]:
        if KEY_PRE not in md:
            warnings.warn(f"{path or '<memory>'}: no {KEY_PRE!r} in the GGUF; using llama.cpp's 'default' "
                          "pre-tokenizer (generation quality may suffer)", stacklevel=3)
            pre_name = "default"
        else:
            pre_name = md[KEY_PRE]
            if not isinstance(pre_name, str):
                raise ModelFileError(path, f"metadata {KEY_PRE!r}", f"expected a string, got {pre_name!r:.60}")
        pre = PRE_TOKENIZERS.get(pre_name)
        if pre is None:
            raise ModelFileError(path, f"metadata {KEY_PRE!r}",
                                 f"unknown pre-tokenizer {pre_name!r} (supported: {', '.join(sorted(PRE_TOKENIZERS))})")
        return cls(_merges_bpe(md, vocab, path, pre.ignore_merges), pre), pre

    def _splits(self, text: str) -> list[tuple[str, tuple[int, int], Any]]:
        """The pre-tokenizer's pieces with their byte offsets in ``text``'s UTF-8."""
        pts = PreTokenizedString(text)
        self._pre.pre_tokenize(pts)
        return pts.get_splits(offset_referential="original", offset_type="byte")

    def encode_fragments(self, texts: Sequence[str]) -> list[list[int]]:
        # The texts' UTF-8 back to back, the pieces of every text as byte ranges of it, and one
        # BPE call for all of them (a call costs microseconds; a prompt has many fragments).
        data, offsets = pack_strings(texts)
        bounds: list[np.ndarray] = []
        last_piece = []                        # per text: the index of its last piece, -1 if none
        n_pieces = 0
        for text, base in zip(texts, offsets.tolist()):
            splits = self._splits(text)
            if splits:
                b = np.fromiter(chain.from_iterable(o for _, o, _ in splits), dtype=np.int64, count=2 * len(splits))
                bounds.append(b + base)
                n_pieces += len(splits)
            last_piece.append(n_pieces - 1)
        if not n_pieces:
            return [[] for _ in texts]
        ids, ends = self._bpe.encode_words(data, np.concatenate(bounds))
        flat, ends = ids.tolist(), ends.tolist()
        cuts = [0] + [ends[k] if k >= 0 else 0 for k in last_piece]
        return [flat[a:b] for a, b in zip(cuts, cuts[1:])]

    def split(self, text: str) -> list[str]:
        """The pieces the pre-tokenizer cuts ``text`` into (each is BPE-merged on its own)."""
        return [piece for piece, _, _ in self._splits(text)]

    def normal_piece(self, token_text: str) -> bytes:
        try:
            return bytes([_CHAR_TO_BYTE[c] for c in token_text])
        except KeyError:
            # A character outside the byte-level alphabet (a malformed vocabulary): keep its UTF-8.
            return b"".join(bytes([_CHAR_TO_BYTE[c]]) if c in _CHAR_TO_BYTE else c.encode("utf-8")
                            for c in token_text)


def _merges_bpe(md: Mapping[str, Any], vocab: ByteVocab, path: str | None, ignore_merges: bool) -> ByteLevelBPE:
    """The BPE of ``tokenizer.ggml.merges``, each merge "left right" split like llama.cpp does
    (at the first space after the first character).

    Merges whose parts or result are not in the vocabulary are dropped with a warning
    (llama.cpp could not give their result an id either).
    """
    raw = md.get(KEY_MERGES)
    if raw is None:
        raise ModelFileError(path, f"metadata {KEY_MERGES!r}", "missing (a gpt2 BPE vocabulary needs its merges)")
    if not isinstance(raw, (list, StringArray)) or not all(isinstance(m, str) for m in raw[:1]):
        raise ModelFileError(path, f"metadata {KEY_MERGES!r}", "expected an array of strings")
    if isinstance(raw, StringArray):   # the file's bytes as they are: no str per merge
        bpe = ByteLevelBPE(vocab, *raw.buffers(), ignore_merges)
    else:
        try:
            packed = pack_strings(raw)
        except TypeError:   # not every merge is a str
            raise ModelFileError(path, f"metadata {KEY_MERGES!r}", "expected an array of strings") from None
        bpe = ByteLevelBPE(vocab, *packed, 0, ignore_merges)
    if bpe.n_dropped:
        warnings.warn(f"{path or '<memory>'}: ignoring {bpe.n_dropped} BPE merges whose parts or result are not "
                      f"in the vocabulary (first: #{bpe.first_dropped} {raw[bpe.first_dropped]!r})", stacklevel=4)
    return bpe


_SPM_SPACE = "\u2581"   # "▁", SentencePiece's visible space


class _SentencePieceBPE(_TextModel):
    """``tokenizer.ggml.model = llama``: llama.cpp's SPM tokenizer (:class:`rosenblatt.text.bpe.SentencePieceBPE`).

    llama.cpp starts from the characters of a fragment (spaces escaped to ``▁``) and keeps merging
    the adjacent pair whose concatenation is the vocabulary token with the highest score, the
    leftmost pair on equal scores (its work queue's order); a character that never became part
    of a token is emitted as its ``<0xXX>`` byte tokens. The same loop runs here, ties included.
    tests/oracle/test_tokenizer_spm.py checks it against llama.cpp's ids and against a transcription of
    llama.cpp's merge loop.
    """

    default_ids = {"bos": 1, "eos": 2, "unk": 0}

    def __init__(self, bpe: SentencePieceBPE, add_space_prefix: bool):
        self._bpe = bpe
        self.space_prefix = " " if add_space_prefix else ""

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any], tokens: Sequence[str], vocab: ByteVocab,
                      path: str | None) -> tuple["_SentencePieceBPE", PreTokenizer]:
        n = len(tokens)
        scores = md.get(KEY_SCORES)
        if scores is None:   # llama.cpp: every score 0
            scores = np.zeros(n, dtype=np.float32)
        elif not isinstance(scores, (list, np.ndarray)) or len(scores) < n:
            raise ModelFileError(path, f"metadata {KEY_SCORES!r}",
                                 f"expected an array of at least {n} numbers")
        add_prefix = md.get(KEY_ADD_SPACE_PREFIX, True)
        if not isinstance(add_prefix, (bool, int)):
            raise ModelFileError(path, f"metadata {KEY_ADD_SPACE_PREFIX!r}",
                                 f"expected a boolean, got {add_prefix!r:.60}")
        try:   # llama.cpp keeps the scores as float32, so equal float32 scores tie
            scores = np.asarray(scores[:n], dtype=np.float32)
        except (TypeError, ValueError):
            raise ModelFileError(path, f"metadata {KEY_SCORES!r}", "expected an array of numbers") from None
        if scores.shape != (n,):
            raise ModelFileError(path, f"metadata {KEY_SCORES!r}", "expected an array of numbers")
        return cls(SentencePieceBPE(vocab, scores), bool(add_prefix)), PreTokenizer((), add_bos=True)

    def encode_fragments(self, texts: Sequence[str]) -> list[list[int]]:
        data, offsets = pack_strings([t.replace(" ", _SPM_SPACE) for t in texts])
        ids, ends = self._bpe.encode_fragments(data, np.stack([offsets[:-1], offsets[1:]], axis=1), self.unk_id)
        flat, cuts = ids.tolist(), [0] + ends.tolist()
        return [flat[a:b] for a, b in zip(cuts, cuts[1:])]

    def split(self, text: str) -> list[str]:
        return [text] if text else []

    def normal_piece(self, token_text: str) -> bytes:
        return token_text.replace(_SPM_SPACE, " ").encode("utf-8")


_MODEL_BUILDERS: dict[str, Callable[..., tuple[_TextModel, PreTokenizer]]] = {
    "gpt2": _ByteLevelBPE.from_metadata,
    "llama": _SentencePieceBPE.from_metadata,
}
_PLANNED_MODELS: dict[str, str] = {}


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

class Tokenizer:
    """A GGUF vocabulary: ``encode`` text to ids and ``decode`` ids to text as llama.cpp does.

    Build it with :meth:`from_gguf` or :meth:`from_metadata`. Attributes: ``bos_id``, ``eos_id``,
    ``eot_id``, ``eom_id``, ``unk_id``, ``pad_id`` (``None`` when the vocabulary has none),
    ``vocab_size``, ``eog_ids`` (frozenset of end-of-generation ids), ``add_bos``, ``add_eos``,
    ``model`` (``tokenizer.ggml.model``) and ``pre`` (``tokenizer.ggml.pre``).
    """

    def __init__(self, md: Mapping[str, Any], path: str | os.PathLike | None = None):
        # Memory: a 150k vocabulary is kept as the GGUF's StringArray when given one (decoded on
        # access) or as the given list, token attributes as one byte each; text -> id lookups go
        # through a hash table over the token bytes (bpe.ByteVocab: the file's bytes, or one
        # packed buffer for a list). No str or dict entry per token is made.
        self.path = os.fspath(path) if path is not None else None
        p = self.path

        model = md.get(KEY_MODEL)
        if model is None:
            raise ModelFileError(p, f"metadata {KEY_MODEL!r}", "missing")
        if model not in _MODEL_BUILDERS:
            why = _PLANNED_MODELS.get(model, "unknown tokenizer model")
            raise ModelFileError(p, f"metadata {KEY_MODEL!r}", f"{model!r}: {why} (supported: "
                                 f"{', '.join(sorted(_MODEL_BUILDERS))})")
        self.model: str = model

        tokens = md.get(KEY_TOKENS)
        if tokens is None:
            raise ModelFileError(p, f"metadata {KEY_TOKENS!r}", "missing (the file has no vocabulary)")
        if not isinstance(tokens, (list, StringArray)) or not len(tokens) \
                or not all(isinstance(t, str) for t in tokens[:1]):
            raise ModelFileError(p, f"metadata {KEY_TOKENS!r}", "expected a non-empty array of strings")
        n = len(tokens)
        # llama.cpp replaces empty token texts so that they can never match.
        if (tokens.lengths() == 0).any() if isinstance(tokens, StringArray) else not all(tokens):
            tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self._tokens: Sequence[str] = tokens
        self.vocab_size: int = n

        types = md.get(KEY_TOKEN_TYPE)
        if types is None:
            attrs = bytearray([_A_NORMAL]) * n
        else:
            if not isinstance(types, (list, np.ndarray)) or len(types) < n:
                raise ModelFileError(p, f"metadata {KEY_TOKEN_TYPE!r}",
                                     f"expected an array of at least {n} integers, got "
                                     f"{len(types) if isinstance(types, (list, np.ndarray)) else type(types).__name__}")
            table = [int(_TYPE_TO_ATTR.get(TokenType(t), 0)) for t in range(len(TokenType))]
            tt = np.asarray(types[:n])
            if tt.ndim == 1 and tt.dtype.kind in "biu":
                codes = tt.astype(np.int64)
                known = (codes >= 0) & (codes < len(table))   # unknown type codes count as UNDEFINED, as in llama.cpp
                attrs = bytearray(np.where(known, np.array(table, np.uint8)[np.where(known, codes, 0)], 0)
                                  .astype(np.uint8).tobytes())
            else:
                attrs = bytearray(table[t] if isinstance(t, int) and 0 <= t < len(table) else 0 for t in types[:n])
        self._attrs: bytearray = attrs

        # token text → id; on duplicate texts the later id wins (llama.cpp's token_to_id map).
        if isinstance(tokens, StringArray):
            vocab = ByteVocab(*tokens.buffers())   # the file's bytes, as stored
        else:
            try:
                vocab = ByteVocab.from_strings(tokens)
            except TypeError:
                raise ModelFileError(p, f"metadata {KEY_TOKENS!r}", "expected a non-empty array of strings") from None
        self._vocab: ByteVocab = vocab

        self._text_model, pre = _MODEL_BUILDERS[model](md, tokens, vocab, p)
        self.pre: str | None = md.get(KEY_PRE)

        ids = {name: self._read_id(md, key) for name, key in _ID_KEYS.items()}
        for name, default in self._text_model.default_ids.items():
            if _ID_KEYS[name] not in md and default < n:
                ids[name] = default
        self._text_model.unk_id = ids["unk"]
        self.add_bos: bool = self._read_bool(md, KEY_ADD_BOS, pre.add_bos)
        self.add_eos: bool = self._read_bool(md, KEY_ADD_EOS, False)
        if self.add_bos and ids["bos"] is None:
            raise ModelFileError(p, f"metadata {KEY_ADD_BOS!r}", f"is true but {_ID_KEYS['bos']!r} is not set")
        if self.add_eos and ids["eos"] is None:
            raise ModelFileError(p, f"metadata {KEY_ADD_EOS!r}", f"is true but {_ID_KEYS['eos']!r} is not set")

        # Text-detected special tokens (llama.cpp marks each found one CONTROL).
        def detect(current: int | None, texts: Sequence[str]) -> int | None:
            if current is not None:
                return current
            for t in texts:
                i = vocab.lookup(t)
                if i is not None:
                    self._attrs[i] |= _A_CONTROL
                    return i
            return None

        ids["eot"] = detect(ids["eot"], _EOT_TEXTS)
        ids["eom"] = detect(ids["eom"], _EOM_TEXTS)
        ids["fim_pad"] = detect(ids["fim_pad"], _FIM_PAD_TEXTS)
        ids["fim_rep"] = detect(ids["fim_rep"], _FIM_REP_TEXTS)
        ids["fim_sep"] = detect(ids["fim_sep"], _FIM_SEP_TEXTS)

        # CONTROL tokens named "...unused..." are unused (gemma's <unused0> ...).
        flags = np.frombuffer(self._attrs, dtype=np.uint8)
        texts: dict[int, str] = {}      # the special tokens' texts, decoded once (gemma3 has 6k)
        for i in np.flatnonzero(flags & _A_CONTROL).tolist():
            texts[i] = tokens[i]
            if "unused" in texts[i]:
                self._attrs[i] |= _A_UNUSED

        eog: set[int] = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids[k] is not None}
        for t in _EOG_TEXTS:
            i = vocab.lookup(t)
            if i is not None:
                eog.add(i)
                self._attrs[i] |= _A_CONTROL
        for k in ("eos", "eot", "eom"):
            if ids[k] is not None:
                eog.add(ids[k])
        texts_in_eog = {self._tokens[i]: i for i in eog}
        # o200k_harmony: "<|end|>" ends a message, not the generation, when "<|return|>"/"<|call|>" exist.
        if "<|end|>" in texts_in_eog and "<|return|>" in texts_in_eog and "<|call|>" in texts_in_eog:
            end = texts_in_eog["<|end|>"]
            eog.discard(end)
            self._attrs[end] = _A_USER_DEFINED

        self.bos_id: int | None = ids["bos"]
        self.eos_id: int | None = ids["eos"]
        self.eot_id: int | None = ids["eot"]
        self.eom_id: int | None = ids["eom"]
        self.unk_id: int | None = ids["unk"]
        self.pad_id: int | None = ids["pad"]
        self.eog_ids: frozenset[int] = frozenset(eog)

        # Special tokens cut out of the text, longest (in bytes) first; ties in id order.
        special = np.flatnonzero(flags & _A_PARTITION)
        special = special[np.argsort(-vocab.lengths(special), kind="stable")].tolist()
        self._special_all: list[tuple[str, int]] = [(texts[i] if i in texts else tokens[i], i) for i in special]
        self._special_user: list[tuple[str, int]] = [(t, i) for t, i in self._special_all
                                                     if not self._attrs[i] & _A_SPECIAL]
        del flags   # a view that would pin the bytearray's size

        self._pieces: dict[int, bytes] = {}   # token_to_piece results of the tokens seen so far

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_metadata(cls, md: Mapping[str, Any], path: str | os.PathLike | None = None) -> "Tokenizer":
        """Build from a GGUF metadata dict (``rosenblatt.gguf.file.read_metadata``); ``path`` only names errors."""
        return cls(md, path)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "Tokenizer":
        """Build from the tokenizer keys of a GGUF file (vocab-only files work)."""
        from ..gguf.file import read_metadata

        return cls(read_metadata(path), path)

    def _read_id(self, md: Mapping[str, Any], key: str) -> int | None:
        value = md.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelFileError(self.path, f"metadata {key!r}", f"expected an integer, got {value!r:.60}")
        if not 0 <= value < self.vocab_size:
            # llama.cpp ignores an out-of-range special id with a warning.
            warnings.warn(f"{self.path or '<memory>'}: {key} = {value} is outside the vocabulary "
                          f"(size {self.vocab_size}); ignored", stacklevel=3)
            return None
        return value

    def _read_bool(self, md: Mapping[str, Any], key: str, default: bool) -> bool:
        value = md.get(key, default)
        if not isinstance(value, (bool, int)):
            raise ModelFileError(self.path, f"metadata {key!r}", f"expected a boolean, got {value!r:.60}")
        return bool(value)

    # -- vocabulary ----------------------------------------------------------------------------
    def id_to_token(self, token_id: int) -> str:
        """The vocabulary text of a token (byte-level form for BPE tokens, e.g. ``'Ġthe'``)."""
        return self._tokens[self._check_id(token_id)]

    def token_to_id(self, text: str) -> int | None:
        """The id of the token whose vocabulary text is ``text``, or ``None``."""
        return self._vocab.lookup(text)

    def token_type(self, token_id: int) -> TokenAttr:
        """llama.cpp's attributes of a token (after the load-time adjustments)."""
        return TokenAttr(self._attrs[self._check_id(token_id)])

    def token_attrs(self) -> np.ndarray:
        """Every token's :class:`TokenAttr` bits, uint8 [vocab_size] (a copy)."""
        return np.frombuffer(self._attrs, dtype=np.uint8).copy()

    def is_eog(self, token_id: int) -> bool:
        """True for tokens that end generation."""
        return token_id in self.eog_ids

    def _check_id(self, token_id: int) -> int:
        if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id!r} is outside the vocabulary (size {self.vocab_size})")
        return token_id

    # -- encoding ------------------------------------------------------------------------------
    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text`` exactly as llama.cpp's ``llama_tokenize(text, add_special, parse_special)``."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self.bos_id)  # type: ignore[arg-type]
        if text:
            frags = self._partition(text, parse_special)
            prefix = self._text_model.space_prefix
            texts = []
            after_special = True   # the space prefix goes before the first fragment and after specials
            for frag in frags:
                if isinstance(frag, int):
                    after_special = True
                else:
                    texts.append(prefix + frag if after_special else frag)
                    after_special = False
            encoded = iter(self._text_model.encode_fragments(texts))
            for frag in frags:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    out.extend(next(encoded))
        if add_special and self.add_eos:
            out.append(self.eos_id)  # type: ignore[arg-type]
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split ``text`` at special-token occurrences (llama.cpp's ``tokenizer_st_partition``)."""
        specials = self._special_all if parse_special else self._special_user
        frags: list[str | int] = [text]
        for tok_text, tok_id in specials:
            if tok_text not in text:
                continue
            new: list[str | int] = []
            for frag in frags:
                if isinstance(frag, int) or tok_text not in frag:
                    new.append(frag)
                    continue
                parts = frag.split(tok_text)
                if parts[0]:
                    new.append(parts[0])
                for part in parts[1:]:
                    new.append(tok_id)
                    if part:
                        new.append(part)
            frags = new
        return frags

    # -- decoding ------------------------------------------------------------------------------
    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        """The bytes a token stands for (llama.cpp's ``token_to_piece``).

        With ``special=False`` CONTROL and UNKNOWN tokens give ``b""``. A piece can be part of a
        multi-byte UTF-8 character.
        """
        piece = self._pieces.get(self._check_id(token_id))
        if piece is None:
            piece = self._pieces[token_id] = self._make_piece(token_id)
        if not special and self._attrs[token_id] & _A_SPECIAL:
            return b""
        return piece

    def _make_piece(self, token_id: int) -> bytes:
        attr = self._attrs[token_id]
        text = self._tokens[token_id]
        if attr & (_A_SPECIAL | _A_USER_DEFINED):
            return text.encode("utf-8")
        if attr & _A_NORMAL:
            return self._text_model.normal_piece(text)
        if attr & _A_BYTE:
            m = _BYTE_TOKEN.fullmatch(text)
            return bytes([int(m.group(1), 16)]) if m else b""
        return b""  # UNUSED, UNDEFINED

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        """The concatenated pieces of ``ids`` (may end inside a UTF-8 character)."""
        piece = self.token_to_piece
        return b"".join([piece(i, not skip_special) for i in ids])

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``: the pieces concatenated and decoded as UTF-8 (U+FFFD for invalid bytes).

        By default special tokens are rendered as their text (like llama.cpp's generated text);
        ``skip_special=True`` drops CONTROL/UNKNOWN tokens (USER_DEFINED ones are always text).
        """
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def pre_tokenize(self, text: str) -> list[str]:
        """The pieces the pre-tokenizer splits a special-token-free ``text`` into (for inspection)."""
        return self._text_model.split(text)

    def streaming(self, skip_special: bool = False) -> "StreamingDetokenizer":
        """A detokenizer fed one id at a time (see :class:`StreamingDetokenizer`)."""
        return StreamingDetokenizer(self, skip_special=skip_special)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.model}/{self.pre}, {self.vocab_size} tokens, bos={self.bos_id}, "
                f"eos={self.eos_id}, eog={sorted(self.eog_ids)})")


def compiled(md: Mapping[str, Any]) -> bool:
    """Whether numba's cache holds the kernels of the tokenizer that ``md`` describes (a first
    run compiles them: ~4 s on a 2-core x86 server)."""
    return all(jit.cached(k) for k in KERNELS.get(md.get(KEY_MODEL), ()))


def precompile(path: str) -> None:
    """Build the tokenizer of the GGUF at ``path`` and encode a word, as :meth:`Engine.load`
    does: numba's cache then holds the very kernels a load of that file runs (the target of the
    load's :class:`~rosenblatt.cpu.jit.Helper` on a first run)."""
    from ..gguf.file import GGUFFile
    Tokenizer.from_metadata(GGUFFile(path).raw_metadata, path).encode("Hello", add_special=False)


class StreamingDetokenizer:
    """Incremental detokenization: ``add(id)`` returns only the newly completed text.

    The bytes of a character split over several tokens are held back until the character is
    complete, so the returned strings never contain broken UTF-8; bytes that cannot become valid
    UTF-8 come out as U+FFFD, exactly as :meth:`Tokenizer.decode` renders them. The text after
    :meth:`flush` equals ``tokenizer.decode(all_ids, skip_special)``. Each step costs O(length of
    the token's piece), independent of the history.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tok = tokenizer
        self._special = not skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chunks: list[str] = []
        self._joined: str | None = ""
        self.ids: list[int] = []

    def add(self, token_id: int) -> str:
        """Feed one token id; return the text it completes (possibly ``""``)."""
        piece = self._tok.token_to_piece(token_id, self._special)
        self.ids.append(token_id)
        out = self._decoder.decode(piece, final=False)
        if out:
            self._chunks.append(out)
            self._joined = None
        return out

    def flush(self) -> str:
        """End of stream: return what was held back (U+FFFD for an incomplete character)."""
        out = self._decoder.decode(b"", final=True)
        if out:
            self._chunks.append(out)
            self._joined = None
        return out

    @property
    def pending(self) -> bool:
        """True while bytes of an incomplete character are held back."""
        return bool(self._decoder.getstate()[0])

    @property
    def text(self) -> str:
        """All text returned so far."""
        if self._joined is None:
            self._joined = "".join(self._chunks)
            self._chunks = [self._joined]
        return self._joined


__all__ = ["PRE_TOKENIZERS", "PreTokenizer", "StreamingDetokenizer", "TokenAttr", "TokenType", "Tokenizer"]
