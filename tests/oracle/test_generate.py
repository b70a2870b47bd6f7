"""Engine text API: generate / stream / chat on the real SmolLM2 and the micro models."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from rosenblatt.params import GenerationParams, ParamError

from rosenblatt import Engine

from support import FIXTURES, micro_path

REFS = {p["name"]: p for p in json.loads((FIXTURES / "smollm2" / "smollm2-refs.json").read_text())["prompts"]}


def check_against_llamacpp(ref, ours):
    """Free-running greedy ids vs llama.cpp's: equal while the contexts agree; at the first
    difference the teacher-forced criteria hold (ours in llama.cpp's top-5, margin <= 3)."""
    for k, tok in enumerate(ours[:len(ref["greedy_ids"])]):
        step = ref["gen_steps"][k]
        if tok != ref["greedy_ids"][k]:
            assert tok in [t for t, _ in step["top5"]], f"step {k}: {tok} not in llama.cpp's top-5"
            assert step["margin"] <= 3, f"step {k}: differs where llama.cpp's margin is {step['margin']:.2f}"
            return k
    return None


@pytest.mark.parametrize("name", list(REFS))
def test_greedy_generation_matches_llamacpp(smollm2_engine, name):
    ref = REFS[name]
    text = smollm2_engine.generate(ref["rendered"], max_new_tokens=32, temperature=0)
    st = smollm2_engine.stats
    assert st.prompt_tokens == len(ref["prompt_ids"])
    diverged = check_against_llamacpp(ref, st.tokens)
    if diverged is None:   # no divergence: the text is exactly llama.cpp's (minus the end token)
        assert text == ref["greedy_text_no_special"]
        assert st.finish_reason == ("stop" if ref["stopped_at_eog"] else "length")


def test_stream_pieces_concatenate_to_generate(smollm2_engine):
    prompt = REFS["chat_system_user"]["rendered"]
    pieces = list(smollm2_engine.stream(prompt, max_new_tokens=20, temperature=0))
    assert len(pieces) > 5
    assert "".join(pieces) == smollm2_engine.generate(prompt, max_new_tokens=20, temperature=0)
    assert smollm2_engine.stats.generated_tokens == 20 and smollm2_engine.stats.finish_reason == "length"


def test_seeded_sampling_is_reproducible(smollm2_engine):
    kw = dict(max_new_tokens=24, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = smollm2_engine.generate("Once upon a time", seed=5, **kw)
    b = smollm2_engine.generate("Once upon a time", seed=5, **kw)
    c = smollm2_engine.generate("Once upon a time", seed=6, **kw)
    assert a == b and a != c


def test_stop_strings_cut_the_output(smollm2_engine):
    """(The word after "The" is a near-tie: llama.cpp's logits are 14.469 " United", 14.452 " answer";
    one continuation ends within 30 tokens, hence ignore_eos.)"""
    prompt = "The capital of France is"
    full = smollm2_engine.generate(prompt, max_new_tokens=30, temperature=0, ignore_eos=True)
    assert full.startswith(" Paris.\n\nThe ") and smollm2_engine.stats.finish_reason == "length"
    word = full.split()[2]                       # the word after "Paris.\n\nThe"
    cut = smollm2_engine.generate(prompt, max_new_tokens=30, temperature=0, stop=[word], ignore_eos=True)
    assert cut == full[:full.index(word)] == " Paris.\n\nThe " and smollm2_engine.stats.finish_reason == "stop"
    # a stop string spanning several tokens is held back while it might still match
    stop = "The " + word + " " + full.split()[3]
    assert stop in full
    pieces = list(smollm2_engine.stream(prompt, max_new_tokens=30, temperature=0, stop=[stop], ignore_eos=True))
    assert "".join(pieces) == full[:full.index(stop)] == " Paris.\n\n"
    assert all(stop not in p for p in pieces)


def test_chat_reuses_the_kv_cache_across_turns(smollm2_engine):
    smollm2_engine.reset()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    first = smollm2_engine.chat(msgs, max_new_tokens=12, temperature=0)
    n1 = smollm2_engine.stats.prompt_tokens
    assert smollm2_engine.stats.cached_tokens == 0
    msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": "And of Italy?"}]
    smollm2_engine.chat(msgs, max_new_tokens=8, temperature=0)
    st = smollm2_engine.stats
    assert st.cached_tokens >= n1 - 1 and st.prompt_tokens - st.cached_tokens < 20


@pytest.mark.slow
def test_cache_reuse_gives_the_same_output_as_a_fresh_context(smollm2_engine):
    """Reusing a cached prefix computes the same thing as a fresh context. Checked with the exact
    float kernels: with int8 activations a 1e-6 difference between a batched and a single-row
    evaluation of the prefix can legitimately flip a near-tie token."""
    ref = REFS["chat_user"]
    ids = ref["prompt_ids"]
    backend = smollm2_engine.model.backend
    backend.kernels = "float"
    try:
        smollm2_engine.reset()
        smollm2_engine.generate(ids[:20], max_new_tokens=3, temperature=0)    # leaves >= 20 tokens cached
        reused = smollm2_engine.generate(ids, max_new_tokens=8, temperature=0)
        assert smollm2_engine.stats.cached_tokens >= 20
        smollm2_engine.reset()
        assert smollm2_engine.generate(ids, max_new_tokens=8, temperature=0) == reused
    finally:
        backend.kernels = "int8"


def test_same_prompt_twice_gives_the_same_output(smollm2_engine):
    """The second call reuses the whole prompt but its last token: same numerics, same text."""
    prompt = REFS["chat_user"]["rendered"]
    smollm2_engine.reset()
    first = smollm2_engine.generate(prompt, max_new_tokens=16, temperature=0)
    second = smollm2_engine.generate(prompt, max_new_tokens=16, temperature=0)
    assert smollm2_engine.stats.cached_tokens == smollm2_engine.stats.prompt_tokens - 1
    assert first == second


def test_stats_report_speed(smollm2_engine):
    smollm2_engine.reset()
    smollm2_engine.generate("Hello", max_new_tokens=5, temperature=0)
    st = smollm2_engine.stats
    assert st.generated_tokens == 5 and st.prefill_tok_s > 0 and st.decode_tok_s > 0
    assert "tok/s" in st.summary()


def test_prompt_errors(smollm2_engine):
    with pytest.raises(ValueError, match="empty"):
        smollm2_engine.generate("", max_new_tokens=3)
    with pytest.raises(ValueError, match="context"):
        smollm2_engine.generate([1] * 600, max_new_tokens=3)
    with pytest.raises(ValueError, match="temperature"):
        smollm2_engine.generate("hi", temperature=-1)


@pytest.mark.parametrize("kw, param", [({"max_new_tokens": 1.5}, "max_new_tokens"),
                                       ({"max_new_tokens": None}, "max_new_tokens"),
                                       ({"stop": [1]}, "stop[0]"), ({"temprature": 0}, "temprature"),
                                       ({"seed": -3}, "seed")])
def test_bad_keywords_name_the_parameter(smollm2_engine, kw, param):
    """Every generation keyword is checked by the one declaration before anything runs."""
    with pytest.raises(ParamError) as e:
        smollm2_engine.generate("hi", **kw)
    assert e.value.param == param and str(e.value).startswith(param + ":")


@pytest.mark.parametrize("call, param, fragment", [
    (lambda e: e.logits([2**63]), "token_ids", "outside the vocabulary"),
    (lambda e: e.logits([-1]), "token_ids", "outside the vocabulary"),
    (lambda e: e.logits([1.5]), "token_ids", "integers, got 1.5"),
    (lambda e: e.logits([True]), "token_ids", "integers, got True"),
    (lambda e: e.logits("hello"), "token_ids", "list of token ids"),
    (lambda e: e.logits(np.array([1.0, 2.0])), "token_ids", "integer token ids"),
    (lambda e: e.generate([1, 2**40]), "prompt", "outside the vocabulary"),
    (lambda e: e.generate([]), "prompt", "empty"),
    (lambda e: e.generate(""), "prompt", "empty"),
])
def test_bad_token_ids_name_the_argument_and_the_model(smollm2_engine, call, param, fragment):
    """Token ids are integers inside the vocabulary: anything else is refused by name (never cast:
    1.5 used to become id 1), with the model's file named where the vocabulary is the reason."""
    with pytest.raises(ParamError) as e:
        call(smollm2_engine)
    assert e.value.param == param and fragment in str(e.value), str(e.value)
    if fragment in ("outside the vocabulary", "empty"):
        assert os.path.basename(smollm2_engine.path) in str(e.value)
    # numpy integer ids are ids
    assert smollm2_engine.logits(np.array([1, 2], np.int32)).shape[0] == 2


def test_empty_stop_strings_stop_nothing(smollm2_engine):
    """``stop=""`` and ``stop=[""]`` mean the same thing: no stop string (one returned '', the other
    was ignored)."""
    kw = dict(max_new_tokens=5, temperature=0)
    plain = smollm2_engine.generate("The sky is", **kw)
    assert plain and smollm2_engine.generate("The sky is", stop="", **kw) == plain
    assert smollm2_engine.generate("The sky is", stop=[""], **kw) == plain


def test_params_object_and_keywords_agree(smollm2_engine):
    """A GenerationParams and the same fields as keywords give the same text; keywords override."""
    p = GenerationParams(max_new_tokens=6, temperature=0)
    assert smollm2_engine.generate("The sky is", p) == smollm2_engine.generate("The sky is", max_new_tokens=6,
                                                                               temperature=0)
    assert len(smollm2_engine.tokenize(smollm2_engine.generate("The sky is", p, max_new_tokens=2),
                                       add_special=False)) <= 2


def test_tokenize_detokenize(smollm2_engine):
    ids = smollm2_engine.tokenize("<|im_start|>user\nhi")
    assert ids[0] == 1 and smollm2_engine.detokenize(ids) == "<|im_start|>user\nhi"


def test_micro_model_greedy_matches_llamacpp_ids():
    """On the F32 micro model llama.cpp and an exact engine agree on all 16 greedy tokens."""
    meta = json.loads((FIXTURES / "references" / "qwen2-micro-f32.json").read_text())
    e = Engine.load(micro_path("qwen2-micro-f32"), n_ctx=64)
    # llama.cpp ignored EOS for the micro references: end-of-generation ids must not stop us either
    logits = e.logits(meta["prompt_ids"])[-1]
    ids = list(meta["prompt_ids"])
    out = []
    for _ in range(16):
        tok = int(np.argmax(logits))
        out.append(tok)
        ids.append(tok)
        logits = e.eval([tok])[0]
    assert out == meta["greedy_ids"]


def test_public_names():
    import rosenblatt
    from support import FIXTURES as F
    tok = rosenblatt.Tokenizer.from_gguf(F / "tokenizer" / "qwen2.5.vocab.gguf")   # a vocab-only GGUF
    assert tok.encode("<|im_start|>user") == [151644, 872]
    for name in ("Engine", "Tokenizer", "ChatTemplate", "SamplingParams", "Sampler", "GenerationStats",
                 "ModelFileError", "RosenblattError"):
        assert hasattr(rosenblatt, name), name


def test_responses_carry_tokens_logprobs_and_a_last_finish_reason(smollm2_engine):
    """engine.responses (rosenblatt.generate.stream_generate): one response per generated token
    with its id and log-probability, then a last one with the finish reason; the texts are
    generate()'s, and each logprob is log softmax of the teacher-forced logits at that position."""
    prompt = REFS["chat_system_user"]["rendered"]
    rs = list(smollm2_engine.responses(prompt, max_new_tokens=12, temperature=0, logprobs=True))
    *steps, last = rs
    assert last.token is None and last.finish_reason in ("stop", "length")
    assert all(r.finish_reason is None and r.token is not None for r in steps)
    st = last.stats
    assert st is smollm2_engine.stats and all(r.stats is st for r in rs)
    assert "".join(r.text for r in rs) == smollm2_engine.generate(prompt, max_new_tokens=12, temperature=0)
    assert [r.token for r in steps] == st.tokens[:len(steps)] and st.generated_tokens >= len(steps)
    ids = smollm2_engine.tokenize(prompt)
    rows = smollm2_engine.logits(ids + [r.token for r in steps])[len(ids) - 1:].astype(np.float64)
    for r, row in zip(steps, rows):
        ref = row[r.token] - row.max() - np.log(np.exp(row - row.max()).sum())
        assert r.logprob <= 0 and abs(r.logprob - ref) < 1e-3, (r.logprob, ref)
    assert all(r.logprob is None for r in smollm2_engine.responses(prompt, max_new_tokens=3, temperature=0))


def test_no_new_tokens_still_reads_the_prompt(smollm2_engine):
    rs = list(smollm2_engine.responses("Hello there", max_new_tokens=0, temperature=0))
    assert len(rs) == 1 and rs[0].text == "" and rs[0].finish_reason == "length"
    assert rs[0].stats.prompt_tokens == len(smollm2_engine.tokenize("Hello there")) and rs[0].stats.prefill_s > 0


@pytest.mark.parametrize("kw, param", [({"n_ctx": 0}, "n_ctx"), ({"n_ctx": 1.5}, "n_ctx"), ({"n_ctx": None}, "n_ctx"),
                                       ({"threads": 0}, "threads"), ({"threads": 1.5}, "threads"),
                                       ({"npu_min_rows": -1}, "npu_min_rows"), ({"device": 1}, "device")])
def test_load_arguments_are_checked_by_name_before_the_file_is_read(kw, param):
    with pytest.raises(ParamError) as e:
        Engine.load("/no/such/file.gguf", **kw)         # the argument is reported, not the file
    assert e.value.param == param


def test_tokenize_and_detokenize_arguments(smollm2_engine):
    with pytest.raises(ParamError, match="text"):
        smollm2_engine.tokenize(5)
    for bad in ([1.5], [10**9], "abc"):
        with pytest.raises(ParamError, match="ids"):
            smollm2_engine.detokenize(bad)


def test_batch_generator_gives_each_generation_its_text_alone(smollm2_engine):
    """Five generations through three slots (greedy, seeded sampling, a stop string, different
    lengths; the last two wait for a free slot): each text and token list equals the same
    generation run alone with Engine.responses; a removed one ends 'cancelled' and frees its slot."""
    from rosenblatt.generate import BatchGenerator
    e = smollm2_engine
    jobs = [("The capital of France is", GenerationParams(max_new_tokens=12, temperature=0)),
            ("Once upon a time", GenerationParams(max_new_tokens=20, temperature=0.8, seed=5)),
            ("1, 2, 3, 4,", GenerationParams(max_new_tokens=30, temperature=0, stop=("9",))),
            ("def add(a, b):", GenerationParams(max_new_tokens=7, temperature=0.9, seed=1, top_k=5)),
            ("Hello", GenerationParams(max_new_tokens=0))]
    alone = []
    for prompt, p in jobs:
        rs = list(e.responses(prompt, p))
        alone.append(("".join(r.text for r in rs), rs[-1].stats.tokens, rs[-1].finish_reason))
    batch = BatchGenerator(e, slots=3)
    waiting, texts, done, uid_of = list(enumerate(jobs)), {}, {}, {}
    for _ in range(500):
        while batch.free and waiting:
            i, (prompt, p) = waiting.pop(0)
            ids, q = e.prepare(prompt, p)
            uid_of[batch.insert(ids, q)] = i
        if not batch.running:
            break
        for uid, r in batch.step():
            i = uid_of[uid]
            texts[i] = texts.get(i, "") + r.text
            if r.finish_reason:
                done[i] = (texts[i], list(r.stats.tokens), r.finish_reason)
    assert [done[i] for i in range(len(jobs))] == alone
    assert batch.free == 3
    uid = batch.insert(*e.prepare("Tell me a story", GenerationParams(max_new_tokens=50, temperature=0)))
    for _ in range(3):
        batch.step()
    last = batch.remove(uid)
    assert last.finish_reason == "cancelled" and batch.free == 3 and batch.running == 0


def test_top_logprobs_are_log_softmax_most_likely_first():
    from rosenblatt.generate import logprob, top_logprobs
    x = np.array([0.5, 2.0, -1.0, 2.0, 1.0], np.float32)
    ref = np.log(np.exp(x.astype(np.float64)) / np.exp(x.astype(np.float64)).sum())
    got = top_logprobs(x, 3)
    assert [i for i, _ in got] == [1, 3, 4]                         # ties: the lower id first
    assert np.allclose([v for _, v in got], ref[[1, 3, 4]], rtol=0, atol=1e-12)
    assert all(v == logprob(x, i) for i, v in got)                   # the chosen token's own value
    assert len(top_logprobs(x, 10)) == 5


def test_batch_generator_shares_an_identical_prompt(smollm2_engine):
    """Two generations of one prompt waiting together: the prompt's keys and values are computed
    once (the second copies them) and both texts are what each gets alone."""
    from rosenblatt.generate import BatchGenerator
    e = smollm2_engine
    prompt = "The history of the printing press begins in " * 4
    params = [GenerationParams(max_new_tokens=6, temperature=0.9, seed=s) for s in (1, 2)]
    alone = ["".join(r.text for r in e.responses(prompt, p)) for p in params]
    batch = BatchGenerator(e, slots=2)
    fed = []

    class Counting:                     # the model, counting the prompt tokens it is given
        def __getattr__(self, name):
            return getattr(e.model, name)

        def forward(self, tokens, cache, logits="last", ops=None):
            fed.append(len(tokens))
            return e.model.forward(tokens, cache, logits, ops)

    batch.model = Counting()
    uids = [batch.insert(*e.prepare(prompt, p)) for p in params]
    texts = {u: "" for u in uids}
    while batch.running:
        for uid, r in batch.step():
            texts[uid] += r.text
    n = len(e.tokenize(prompt))
    assert sum(fed) == (n - 1) + 2          # the shared prefix once, each last prompt token alone
    assert [texts[u] for u in uids] == alone


def _alone_in(batch, engine, prompt, params) -> str:
    """The text of ``prompt`` generated as the only generation in ``batch``."""
    uid = batch.insert(*engine.prepare(prompt, params))
    text = ""
    while batch.running:
        for u, r in batch.step():
            text += r.text if u == uid else ""
    return text


def test_batch_generator_reuses_a_finished_prompts_whole_chunks_exactly(smollm2_engine):
    """A later prompt sharing a long prefix with what a slot holds reuses the prefix's whole
    prefill chunks (and computes only the rest); its text is the one a fresh batch gives."""
    from rosenblatt.generate import BatchGenerator
    e = smollm2_engine
    system = "You are a helpful assistant who answers briefly. " * 12            # ~120 tokens
    prompts = [system + "Question: what is two plus two?", system + "Question: name a red fruit."]
    p = GenerationParams(max_new_tokens=8, temperature=0)

    def run(batch, prompt):
        return _alone_in(batch, e, prompt, p)

    fresh = [run(BatchGenerator(e, slots=1), q) for q in prompts]
    batch = BatchGenerator(e, slots=1)
    assert run(batch, prompts[0]) == fresh[0] and batch.reused_tokens == 0
    assert run(batch, prompts[1]) == fresh[1]
    common = next(i for i, (a, b) in enumerate(zip(e.tokenize(prompts[0]), e.tokenize(prompts[1]))) if a != b)
    assert batch.reused_tokens == common // batch.chunk * batch.chunk > 0


def test_batch_generator_keeps_prefixes_beyond_its_slots(smollm2_engine):
    """One slot, one spare: a long shared prefix survives an unrelated prompt in between (it is
    copied to the spare when the slot is given away) and is reused exactly after it; with no
    spare it is gone."""
    from rosenblatt.generate import BatchGenerator
    e = smollm2_engine
    system = "You are a helpful assistant who answers briefly. " * 12            # ~120 tokens
    prompts = [system + "Question: what is two plus two?", "Tell me a story about a fox. " * 10,
               system + "Question: name a red fruit."]
    p = GenerationParams(max_new_tokens=6, temperature=0)

    def run(batch, prompt):
        return _alone_in(batch, e, prompt, p)

    fresh = [run(BatchGenerator(e, slots=1, prefixes=0), q) for q in prompts]
    common = next(i for i, (a, b) in enumerate(zip(e.tokenize(prompts[0]), e.tokenize(prompts[2]))) if a != b)
    for spares, reused in ((1, common // 64 * 64), (0, 0)):
        batch = BatchGenerator(e, slots=1, prefill_chunk=64, prefixes=spares)
        assert [run(batch, q) for q in prompts] == fresh
        assert batch.reused_tokens == reused and (reused > 0 or spares == 0)
    assert batch.kv_bytes == batch.caches[0].nbytes

    # a prefix held by a generation still running is copied, not computed again
    batch = BatchGenerator(e, slots=2, prefill_chunk=64, prefixes=0)
    first = batch.insert(*e.prepare(prompts[0], p))
    texts, started = {first: ""}, False
    while not started:                              # until its first token: its prompt is in
        for u, r in batch.step():
            texts[u] += r.text
            started = True
    second = batch.insert(*e.prepare(prompts[2], p))
    texts[second] = ""
    assert batch.reused_tokens == common // 64 * 64
    while batch.running:
        for u, r in batch.step():
            texts[u] += r.text
    assert [texts[first], texts[second]] == [fresh[0], fresh[2]]


def test_batch_generator_reports_the_kv_in_use(smollm2_engine):
    from rosenblatt.generate import BatchGenerator
    e = smollm2_engine
    batch = BatchGenerator(e, slots=2, prefixes=1)
    assert batch.kv_in_use == 0 and batch.kv_bytes == 3 * batch.caches[0].nbytes      # two slots, one spare
    ids, p = e.prepare("Once upon a time", GenerationParams(max_new_tokens=4, temperature=0))
    batch.insert(ids, p)
    for _ in range(3):
        batch.step()
    per_position = batch.caches[0].nbytes // batch.caches[0].n_ctx
    held = sum(c.length for c in batch.caches if c.length)
    assert batch.kv_in_use == held * per_position > 0
