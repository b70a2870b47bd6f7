"""rosenblatt.text.bpe against plain-Python merge loops (llama.cpp's rules written out the slow way),
on random small vocabularies and on the real Qwen2.5 vocabulary (tests/fixtures/tokenizer)."""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rosenblatt.text.bpe import BYTE_TO_CHAR, ByteLevelBPE, ByteVocab, SentencePieceBPE, pack_strings
from rosenblatt.gguf.file import GGUFFile

from support import FIXTURES

TOK = FIXTURES / "tokenizer"
SPACE = "\u2581"
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------

def ref_vocab(tokens: list[str]) -> dict[str, int]:
    return {t: i for i, t in enumerate(tokens)}          # a later duplicate wins


def ref_ranks(tokens: list[str], merges: list[str]) -> tuple[dict[tuple[str, str], int], int]:
    """(left, right) -> rank of the usable merges (split at the first space after byte 0, the
    first of equal pairs kept), and the number of merges dropped (parts or result not tokens)."""
    vocab = ref_vocab(tokens)
    ranks: dict[tuple[str, str], int] = {}
    dropped = 0
    for rank, m in enumerate(merges):
        raw = m.encode()
        p = raw.find(b" ", 1)
        left, right = (raw[:p].decode(), raw[p + 1:].decode()) if p >= 0 else (m, "")
        if left not in vocab or right not in vocab or left + right not in vocab:
            dropped += 1
            continue
        ranks.setdefault((left, right), rank)
    return ranks, dropped


def ref_gpt2(word: bytes, tokens: list[str], merges: list[str], ignore_merges: bool = False) -> list[int]:
    """llama.cpp's BPE word loop, rescanning for the best pair after every merge: symbols are the
    byte-level characters of the bytes; merge the adjacent pair of lowest rank, leftmost first;
    symbols that are not tokens are left out."""
    vocab = ref_vocab(tokens)
    ranks, _ = ref_ranks(tokens, merges)
    whole = "".join(BYTE_TO_CHAR[b] for b in word)
    if ignore_merges and whole in vocab:
        return [vocab[whole]]
    sym = [BYTE_TO_CHAR[b] for b in word]
    while True:
        best = None
        for i in range(len(sym) - 1):
            r = ranks.get((sym[i], sym[i + 1]))
            if r is not None and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        sym[i:i + 2] = [sym[i] + sym[i + 1]]
    return [vocab[s] for s in sym if s in vocab]


def ref_spm(text: str, tokens: list[str], scores: list[float], unk: int | None = None) -> list[int]:
    """llama.cpp's SPM loop, rescanning for the best pair after every merge: symbols are the
    characters; merge the adjacent pair whose concatenation is the token of highest score,
    leftmost first; a symbol that is not a token becomes <0xXX> tokens (else the single-byte
    token, else unk)."""
    vocab = ref_vocab(tokens)
    sym = list(text)
    while True:
        best = None
        for i in range(len(sym) - 1):
            t = vocab.get(sym[i] + sym[i + 1])
            if t is not None and (best is None or np.float32(scores[t]) > best[0]):
                best = (np.float32(scores[t]), i)
        if best is None:
            break
        i = best[1]
        sym[i:i + 2] = [sym[i] + sym[i + 1]]
    out = []
    for s in sym:
        if s in vocab:
            out.append(vocab[s])
            continue
        for b in s.encode():
            t = vocab.get(f"<0x{b:02X}>", vocab.get(chr(b) if b < 0x80 else None, unk))
            if t is not None:
                out.append(t)
    return out


# ------------------------------------------------------------------------------------------
# ByteVocab
# ------------------------------------------------------------------------------------------

def test_vocab_lookup_and_duplicates():
    tokens = ["a", "b", "ab", "é", "中文", "a", "", "\U0001F600"]
    v = ByteVocab.from_strings(tokens)
    assert len(v) == 8
    for text, want in ref_vocab(tokens).items():
        assert v.lookup(text) == want and v.lookup(text.encode()) == want
    assert v.lookup("a") == 5                             # the later duplicate
    assert v.lookup("zz") is None and v.lookup(b"\xff") is None
    assert v[4] == "中文".encode() and v[6] == b""
    assert list(np.flatnonzero(np.unpackbits(v.replaced, bitorder="little"))) == [0]
    assert v.lengths(np.arange(8)).tolist() == [len(t.encode()) for t in tokens]


def test_pack_strings():
    texts = ["", "abc", "é", "中文x", "", "\U0001F600", "\ud800"]   # a lone surrogate is kept
    data, offsets = pack_strings(texts)
    assert offsets.dtype == np.uint32 and offsets.tolist()[0] == 0
    got = [data[a:b].tobytes() for a, b in zip(offsets.tolist(), offsets.tolist()[1:])]
    assert got == [t.encode("utf-8", "surrogatepass") for t in texts]
    assert pack_strings([])[1].tolist() == [0]


def test_vocab_with_a_header_per_string():
    """The GGUF layout: each string follows an 8-byte length."""
    tokens = ["x", "yz", "é", "x"]
    blob = b"".join(len(t.encode()).to_bytes(8, "little") + t.encode() for t in tokens)
    offsets = np.cumsum([0] + [8 + len(t.encode()) for t in tokens])
    v = ByteVocab(np.frombuffer(blob, np.uint8), offsets, 8)
    assert [v.lookup(t) for t in ("x", "yz", "é", "w")] == [3, 1, 2, None]


@PROPS
@given(tokens=st.lists(st.text(alphabet="ab\u00e9\u4e2d", min_size=1, max_size=4), min_size=1, max_size=60),
       probes=st.lists(st.text(alphabet="ab\u00e9\u4e2d", max_size=5), max_size=20))
def test_prop_vocab_lookup(tokens, probes):
    v, ref = ByteVocab.from_strings(tokens), ref_vocab(tokens)
    for t in tokens + probes:
        assert v.lookup(t) == ref.get(t)


# ------------------------------------------------------------------------------------------
# byte-level BPE
# ------------------------------------------------------------------------------------------

# a byte-level vocabulary over a few bytes: a b c, space (Ġ), 0xC3 0xA9 (é = Ã ©)
ALPHABET = [BYTE_TO_CHAR[b] for b in b"abc \xc3\xa9"]


@st.composite
def bytelevel_vocab(draw):
    base = draw(st.lists(st.sampled_from(ALPHABET), unique=True, min_size=2))   # some bytes have no token
    tokens = list(base)
    merges = []
    for _ in range(draw(st.integers(0, 25))):
        kind = draw(st.integers(0, 9))
        left, right = draw(st.sampled_from(tokens)), draw(st.sampled_from(tokens))
        if kind == 0:
            merges.append(left + right)                   # no separator: dropped
        elif kind == 1:
            merges.append(f"{left} {right}x")             # a part that is not a token: dropped
        else:
            merges.append(f"{left} {right}")
            if kind != 2 or draw(st.booleans()):          # kind 2: maybe without its result (dropped)
                tokens.append(left + right)               # duplicates of earlier texts happen
    merges += draw(st.lists(st.sampled_from(merges), max_size=3)) if merges else []   # repeated pairs
    return draw(st.permutations(tokens)), merges


@PROPS
@given(vocab=bytelevel_vocab(), words=st.lists(st.lists(st.sampled_from(list(b"abc \xc3\xa9\x04")), max_size=12)
                                              .map(bytes), max_size=6),     # 0x04 never has a token
       ignore=st.booleans())
@pytest.mark.slow
def test_prop_bytelevel_equals_merge_loop(vocab, words, ignore):
    tokens, merges = vocab
    bpe = ByteLevelBPE.from_strings(ByteVocab.from_strings(tokens), merges, ignore_merges=ignore)
    assert bpe.n_dropped == ref_ranks(tokens, merges)[1]
    text = b"".join(words)
    cuts = np.cumsum([0] + [len(w) for w in words])
    ids, ends = bpe.encode_words(text, np.stack([cuts[:-1], cuts[1:]], axis=1))
    want = [ref_gpt2(w, tokens, merges, ignore) for w in words]
    assert ids.tolist() == [i for w in want for i in w]
    assert ends.tolist() == np.cumsum([len(w) for w in want]).tolist()


def test_rank_ties_and_first_merge_of_a_pair_wins():
    tokens = ["a", "b", "ab", "bb", "abb"]
    merges = ["b b", "a b", "a b", "ab b"]
    bpe = ByteLevelBPE.from_strings(ByteVocab.from_strings(tokens), merges)
    assert bpe.rank(0, 1) == 1 and bpe.rank(1, 1) == 0 and bpe.rank(2, 1) == 3 and bpe.rank(1, 0) is None
    assert bpe.encode(b"abb").tolist() == [0, 3]          # "b b" (rank 0) before "a b"
    assert bpe.encode(b"bbbb").tolist() == [3, 3]         # equal ranks: leftmost first


def test_bytes_without_a_token_are_left_out_and_block_merges():
    tokens = ["a", "b", "ab"]                             # no token for byte 0x04
    bpe = ByteLevelBPE.from_strings(ByteVocab.from_strings(tokens), ["a b"])
    assert bpe.encode(b"ab").tolist() == [2]
    assert bpe.encode(b"a\x04b").tolist() == [0, 1]       # llama.cpp: the byte stays a symbol, then is dropped
    assert bpe.encode(b"\x04\x04").tolist() == []


def test_merges_are_split_at_the_first_space_after_the_first_byte():
    g = BYTE_TO_CHAR[ord(" ")]                            # "Ġ": a space in the byte-level alphabet
    tokens = ["a", g, " ", "a ", " a", "  a"]             # raw spaces in token texts (malformed, but legal)
    merges = ["  a", "a  ", " a"]                          # (" ", "a"), ("a", " "), (" a", "") -> dropped
    bpe = ByteLevelBPE.from_strings(ByteVocab.from_strings(tokens), merges)
    assert bpe.rank(2, 0) == 0 and bpe.rank(0, 2) == 1
    assert (bpe.n_dropped, bpe.first_dropped) == (1, 2)


def test_long_word_is_fast_and_right():
    a = BYTE_TO_CHAR[ord("a")]
    tokens = [a, a * 2, a * 4, a * 8, "b", a + "b"]
    merges = [f"{a} {a}", f"{a * 2} {a * 2}", f"{a * 4} {a * 4}", f"{a} b"]
    bpe = ByteLevelBPE.from_strings(ByteVocab.from_strings(tokens), merges)
    word = b"a" * 601 + b"b" + b"ab" * 60
    assert bpe.encode(word).tolist() == ref_gpt2(word, tokens, merges)
    big = b"a" * 100_003                                  # 12500 x "aaaaaaaa", then "aa", "a"
    bpe.encode(big)
    t0 = time.perf_counter()
    ids = bpe.encode(big).tolist()
    assert time.perf_counter() - t0 < 1.0
    assert ids == [3] * 12500 + [1, 0]


# ------------------------------------------------------------------------------------------
# SentencePiece BPE
# ------------------------------------------------------------------------------------------

SPM_CHARS = ["a", "b", "c", SPACE, "\u00e9", "\u4e2d"]


@st.composite
def spm_vocab(draw):
    tokens = ["<unk>"]
    tokens += [f"<0x{b:02X}>" for b in draw(st.lists(st.integers(0, 255), unique=True, max_size=6))]
    tokens += draw(st.lists(st.sampled_from(SPM_CHARS), unique=True))             # some characters have no token
    tokens += draw(st.lists(st.sampled_from(["x", "q"]), max_size=2))              # single-byte fallbacks
    for _ in range(draw(st.integers(0, 30))):
        tokens.append("".join(draw(st.lists(st.sampled_from(SPM_CHARS), min_size=2, max_size=5))))
    tokens = [tokens[0]] + draw(st.permutations(tokens[1:]))
    scores = draw(st.lists(st.sampled_from([0.0, -1.0, -2.0, -2.5, -3.0, -1000.0]),   # many ties
                           min_size=len(tokens), max_size=len(tokens)))
    return tokens, scores


@PROPS
@given(vocab=spm_vocab(), texts=st.lists(st.text(alphabet=SPM_CHARS + ["x", "\x00", "\U0001F600"], max_size=16),
                                          max_size=5), unk=st.sampled_from([None, 0]))
@pytest.mark.slow
def test_prop_spm_equals_merge_loop(vocab, texts, unk):
    tokens, scores = vocab
    spm = SentencePieceBPE(ByteVocab.from_strings(tokens), np.array(scores))
    data, offsets = pack_strings(texts)
    ids, ends = spm.encode_fragments(data, np.stack([offsets[:-1], offsets[1:]], axis=1), unk)
    want = [ref_spm(t, tokens, scores, unk) for t in texts]
    assert ids.tolist() == [i for w in want for i in w]
    assert ends.tolist() == np.cumsum([len(w) for w in want]).tolist()


def test_spm_equal_scores_merge_the_leftmost_pair():
    # "bc" has the lower id and the same score as "ab": llama.cpp merges by position, not by id
    tokens = ["<unk>", "a", "b", "c", "bc", "ab"]
    spm = SentencePieceBPE(ByteVocab.from_strings(tokens), np.array([0, -1, -1, -1, -5, -5]))
    assert spm.encode("abc").tolist() == [5, 3]
    assert spm.encode("abcbc").tolist() == [5, 3, 4] == ref_spm("abcbc", tokens, [0, -1, -1, -1, -5, -5])


def test_spm_negative_zero_ties_with_zero():
    # llama.cpp compares float scores: -0.0 == 0.0 (gemma3 has a -0.0), so the leftmost pair wins
    tokens = ["<unk>", "a", "b", "c", "bc", "ab"]
    spm = SentencePieceBPE(ByteVocab.from_strings(tokens), np.array([0, -1, -1, -1, 0.0, -0.0], np.float32))
    assert spm.encode("abc").tolist() == [5, 3]


def test_spm_byte_fallback_order():
    tokens = ["<unk>", "<0x41>", "B", "a"]
    spm = SentencePieceBPE(ByteVocab.from_strings(tokens), np.zeros(4))
    assert spm.encode("a").tolist() == [3]
    assert spm.encode("AB").tolist() == [1, 2]            # <0x41>, then the single-byte token "B"
    assert spm.encode("C", unk=0).tolist() == [0] and spm.encode("C").tolist() == []
    assert spm.encode("\u00e9", unk=0).tolist() == [0, 0]  # one unk per byte without a token


def test_spm_long_fragment_is_fast_and_right():
    tokens = ["<unk>", "a", "aa", "aaaa", "b", "ab", SPACE, SPACE + "a"]
    scores = np.array([0, -1, -2, -3, -1, -2.5, -1, -0.5])
    spm = SentencePieceBPE(ByteVocab.from_strings(tokens), scores)
    text = "a" * 601 + "b" + (SPACE + "ab") * 60
    assert spm.encode(text).tolist() == ref_spm(text, tokens, list(scores))
    big = "a" * 100_002
    spm.encode(big)
    t0 = time.perf_counter()
    ids = spm.encode(big).tolist()
    assert time.perf_counter() - t0 < 1.0
    assert ids == [3] * 25000 + [2]


# ------------------------------------------------------------------------------------------
# the real Qwen2.5 vocabulary
# ------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def qwen_file() -> GGUFFile:
    return GGUFFile(TOK / "qwen2.5.vocab.gguf", load_tensors=False)


def test_qwen_vocabulary_from_the_file_bytes():
    md = qwen_file().raw_metadata
    tokens, merges = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.merges"]
    v = ByteVocab(*tokens.buffers())
    texts = tokens.tolist()
    assert len(v) == len(texts) == 151936
    vocab = ref_vocab(texts)
    assert v.lookup_all(*pack_strings(texts)).tolist() == [vocab[t] for t in texts]

    bpe = ByteLevelBPE(v, *merges.buffers())
    merge_texts = merges.tolist()
    assert bpe.n_dropped == 0 and len(merge_texts) == 151387
    pairs = [m.split(" ", 1) for m in merge_texts]
    assert bpe.left.tolist() == [vocab[a] for a, _ in pairs]
    assert bpe.right.tolist() == [vocab[b] for _, b in pairs]
    assert [bpe.rank(vocab[a], vocab[b]) for a, b in pairs[::97]] == list(range(0, len(pairs), 97))

    # from a list of str: the same tables
    v2 = ByteVocab.from_strings(texts)
    assert (v2.table == v.table).all()
    bpe2 = ByteLevelBPE.from_strings(v2, merge_texts)
    assert (bpe2.table == bpe.table).all() and (bpe2.left == bpe.left).all()

    # everything the tokenizer keeps for lookups and merges, in bytes
    kept = v.table.nbytes + v.replaced.nbytes + bpe.table.nbytes + bpe.left.nbytes + bpe.right.nbytes
    assert kept < 3.5 * 2**20, f"{kept / 2**20:.1f} MiB"


def test_qwen_builds_from_the_file_bytes_without_a_python_object_per_token():
    """What makes the build take tens of milliseconds: no str, tuple or dict entry per token or
    merge (built from lists of str instead, the same tables peak at ~38 MiB of Python heap)."""
    import gc
    import tracemalloc
    md = qwen_file().raw_metadata
    tokens, merges = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.merges"]
    ByteLevelBPE(ByteVocab(*tokens.buffers()), *merges.buffers())      # numba's kernels loaded
    gc.collect()
    tracemalloc.start()
    try:
        bpe = ByteLevelBPE(ByteVocab(*tokens.buffers()), *merges.buffers())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert bpe.n_dropped == 0
    assert peak < 6 * 2**20, f"building allocated up to {peak / 2**20:.1f} MiB of Python objects"


def test_bounds_outside_the_text_are_refused():
    bpe = ByteLevelBPE.from_strings(ByteVocab.from_strings(["a"]), [])
    with pytest.raises(ValueError):
        bpe.encode(b"aa", [[0, 3]])
