"""SentencePiece-style (``tokenizer.ggml.model = llama``) tokenizer: gemma3's vocabulary against
llama.cpp's ids (tests/fixtures/gemma3/README.md, "Tokenizer"), and the SPM rules on a small vocabulary."""

from __future__ import annotations

import heapq
import json
from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rosenblatt.errors import ModelFileError
from rosenblatt.gguf.file import GGUFFile, read_metadata
from rosenblatt.text.tokenizer import TokenAttr, Tokenizer

from support import FIXTURES, gemma3_path

FIX = FIXTURES
G3 = FIX / "gemma3"


def jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


CORPUS = [r["text"] for r in jsonl(FIX / "tokenizer" / "corpus.jsonl")]
PUBLIC = jsonl(G3 / "gemma3.tokenizer.public.jsonl")
EXTRA = jsonl(G3 / "gemma3.tokenizer.extra.jsonl")
SPACE = "\u2581"


@lru_cache(maxsize=None)
def metadata() -> dict:
    return read_metadata(gemma3_path())


@lru_cache(maxsize=None)
def gemma3() -> Tokenizer:
    return Tokenizer.from_metadata(metadata(), gemma3_path())


# ------------------------------------------------------------------------------------------
# ids against llama.cpp
# ------------------------------------------------------------------------------------------

def test_file_view_tokenizer_matches_llamacpp():
    """Built as Engine.load builds it (vocabulary, scores and types as views of the file)."""
    g = GGUFFile(gemma3_path(), load_tensors=False)
    tk, ref_tk = Tokenizer.from_metadata(g.raw_metadata, g.path), gemma3()
    for ref in PUBLIC + EXTRA:
        assert tk.encode(ref["text"], add_special=True, parse_special=True) == ref["ids"]
        assert tk.encode(ref["text"], add_special=False, parse_special=False) == ref["ids_no_special"]
    assert (tk.token_attrs() == ref_tk.token_attrs()).all()
    assert tk.eog_ids == ref_tk.eog_ids and tk._special_all == ref_tk._special_all
    assert [tk.id_to_token(i) for i in range(tk.vocab_size)] == metadata()["tokenizer.ggml.tokens"]


def test_fixture_files_cover_the_shared_corpus_and_both_modes():
    assert [r["text"] for r in PUBLIC] == CORPUS
    assert len(EXTRA) == 16
    assert any(r["ids"] != [2] + r["ids_no_special"] for r in EXTRA)   # the modes differ on the extra texts


@pytest.mark.parametrize("ref", PUBLIC + EXTRA, ids=[f"public{i:02d}" for i in range(len(PUBLIC))]
                         + [f"extra{r['id']:02d}-{r['category']}" for r in EXTRA])
def test_ids_match_llamacpp_in_both_modes(ref):
    tk = gemma3()
    assert tk.encode(ref["text"], add_special=True, parse_special=True) == ref["ids"]
    assert tk.encode(ref["text"], add_special=False, parse_special=False) == ref["ids_no_special"]


def test_decode_round_trip_on_all_fixture_texts():
    tk = gemma3()
    for ref in PUBLIC + EXTRA:
        assert tk.decode(ref["ids_no_special"]) == ref["text"]
        assert tk.decode(ref["ids"]) == "<bos>" + ref["text"]


def test_special_tokens_of_gemma3():
    tk = gemma3()
    assert (tk.model, tk.vocab_size, tk.bos_id, tk.eos_id, tk.unk_id, tk.pad_id) == ("llama", 262144, 2, 1, 3, 0)
    assert (tk.add_bos, tk.add_eos) == (True, False)
    assert tk.eog_ids == {1, 106, 212}                       # <eos>, <end_of_turn>, and "</s>" by its text
    assert tk.token_type(212) & TokenAttr.CONTROL            # user-defined in the GGUF, control in llama.cpp
    assert tk.token_type(107) == TokenAttr.USER_DEFINED      # "\n"
    assert tk.token_type(105) == TokenAttr.CONTROL           # <start_of_turn>
    assert tk.token_type(6) & TokenAttr.UNUSED               # <unused0>


def test_no_space_prefix_and_spaces_become_the_space_token():
    tk = gemma3()
    assert tk.id_to_token(236743) == SPACE
    assert tk.encode("Hello", add_special=False) == [9259]               # no "▁Hello": add_space_prefix is false
    assert tk.encode(" ", add_special=False) == [236743]
    assert tk.encode("\n\n", add_special=False) == [108]                # user-defined newline run


def test_byte_fallback():
    tk = gemma3()
    assert tk.encode("\x00", add_special=False) == [238]                # <0x00>
    ids = tk.encode("a\U00013000b", add_special=False)                  # EGYPTIAN HIEROGLYPH A001: no token
    assert ids[1:5] == [238 + b for b in "\U00013000".encode()]
    assert tk.decode(ids) == "a\U00013000b"
    stream = tk.streaming()
    assert [stream.add(i) for i in ids] == ["a", "", "", "", "\U00013000", "b"]


# ------------------------------------------------------------------------------------------
# rosenblatt.text.bpe against llama.cpp's merge loop
# ------------------------------------------------------------------------------------------

def spm_merge_loop(text: str, tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[int]:
    """llama.cpp's SPM algorithm written out directly (slow; to check rosenblatt.text.bpe against).

    Start from the characters (spaces as ▁); repeatedly merge the adjacent pair whose concatenation
    is the token with the highest score, leftmost first on ties; characters left without a token
    become <0xXX> byte tokens. A transcription of llm_tokenizer_spm_session::tokenize: the heap
    entries (-score, left position, ...) pop in the order of llama.cpp's work-queue comparator
    (higher score first, then the smaller left index), and a popped pair whose symbols changed
    since is skipped by the same size check.
    """
    sym = list(text.replace(" ", SPACE))
    nxt = list(range(1, len(sym))) + [-1]
    prv = list(range(-1, len(sym) - 1))
    heap: list[tuple[float, int, int, int]] = []

    def push(left: int, right: int) -> None:
        if left >= 0 and right >= 0:
            i = vocab.get(sym[left] + sym[right])
            if i is not None:
                heapq.heappush(heap, (-scores[i], left, right, len(sym[left]) + len(sym[right])))

    for i in range(1, len(sym)):
        push(i - 1, i)
    while heap:
        _, left, right, size = heapq.heappop(heap)
        if not sym[left] or not sym[right] or len(sym[left]) + len(sym[right]) != size:
            continue   # stale: one side has merged since
        sym[left], sym[right] = sym[left] + sym[right], ""
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prv[nxt[right]] = left
        push(prv[left], left)
        push(left, nxt[left])
    out, i = [], 0 if sym else -1
    while i >= 0:
        tid = vocab.get(sym[i])
        out.extend([tid] if tid is not None else [vocab[f"<0x{b:02X}>"] for b in sym[i].encode()])
        i = nxt[i]
    return out


@lru_cache(maxsize=None)
def merge_loop_inputs():
    md = metadata()
    tokens = md["tokenizer.ggml.tokens"]
    return tokens, md["tokenizer.ggml.scores"], {t: i for i, t in enumerate(tokens)}


def test_merge_loop_reference_agrees_with_llamacpp():
    """The slow reference itself reproduces the fixtures (so the property test below checks against llama.cpp)."""
    for ref in PUBLIC + EXTRA:
        ids = []
        for frag in gemma3()._partition(ref["text"], parse_special=False):   # user-defined tokens cut out
            ids.extend([frag] if isinstance(frag, int) else spm_merge_loop(frag, *merge_loop_inputs()))
        assert ids == ref["ids_no_special"]


# pieces that make merges compete: control-token names as plain text (score ties at -1000),
# byte-token spellings, overlapping repeats, combining marks, characters without a token
PIECES = ["<start_of_turn>", "<end_of_turn>", "<unused12>", "<bos>", "<eos>", "<0x41>", "<mask>", "</s>",
          "[multimodal]", "ab", "aba", "ba", "a", " ", "é", "e\u0301", "中文", "😀", "\u200b", "<", ">", "_", "x",
          "0x", "unused", "1", "\U00013000", "\x00"]
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(pieces=st.lists(st.sampled_from(PIECES), max_size=14),
       noise=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12))
def test_prop_bpe_equals_merge_loop(pieces, noise):
    text = "".join(pieces) + noise
    assert gemma3()._text_model.encode(text) == spm_merge_loop(text, *merge_loop_inputs())


@PROPS
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters=SPACE), max_size=60),
       parse=st.booleans())
def test_prop_round_trip(text, parse):
    # "▁" itself is excluded: SPM reads it as a space, as llama.cpp does
    tk = gemma3()
    bos = "<bos>" if parse else ""
    assert tk.decode(tk.encode(text, add_special=parse, parse_special=parse)) == bos + text


# ------------------------------------------------------------------------------------------
# SPM rules on a small vocabulary (llama.cpp's defaults when keys are absent)
# ------------------------------------------------------------------------------------------

def tiny_vocab(**changes) -> dict:
    tokens = ["<unk>", "<s>", "</s>", "<ctl>", "<ud>"] + [f"<0x{b:02X}>" for b in range(256)] \
        + [SPACE, "a", "b", "c", SPACE + "a", "ab", "bc", SPACE + "ab", "abc", SPACE + "abc"]
    types = [2, 3, 3, 3, 4] + [6] * 256 + [1] * 10
    scores = [0.0] * 261 + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0, -10.0]
    md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
          "tokenizer.ggml.scores": scores}
    for key, value in changes.items():
        key = "tokenizer.ggml." + key
        if value is None:
            md.pop(key, None)
        else:
            md[key] = value
    return md


def tid(md: dict, text: str) -> int:
    return md["tokenizer.ggml.tokens"].index(text)


def test_llamacpp_spm_defaults():
    md = tiny_vocab()
    tk = Tokenizer.from_metadata(md)
    assert (tk.unk_id, tk.bos_id, tk.eos_id, tk.add_bos, tk.add_eos) == (0, 1, 2, True, False)
    # add_space_prefix defaults to true: "▁" before the text and after every special token
    assert tk.encode("abc") == [1, tid(md, SPACE + "abc")]
    assert tk.encode("abc<ctl>abc<ud>bc") == [1, tid(md, SPACE + "abc"), 3, tid(md, SPACE + "abc"), 4,
                                               tid(md, SPACE), tid(md, "bc")]
    # control tokens are text without parse_special (split into characters and bytes: no merges apply),
    # user-defined ones are always tokens, and the prefix space follows them too
    plain = tk.encode("a<ctl>", add_special=False, parse_special=False)
    assert plain[0] == tid(md, SPACE + "a") and 3 not in plain
    assert tk.decode(plain) == " a<ctl>"
    assert tk.encode("<ud>a", add_special=False, parse_special=False) == [4, tid(md, SPACE + "a")]


def test_merges_follow_scores():
    # without an "abc" token, "abc" ends as ab + c when "ab" scores higher, as a + bc when "bc" does
    tokens = tiny_vocab()["tokenizer.ggml.tokens"][:-2] + ["zz", "zzz"]
    md = tiny_vocab(add_space_prefix=False, tokens=tokens)
    assert Tokenizer.from_metadata(md).encode("abc", add_special=False) == [tid(md, "ab"), tid(md, "c")]
    scores = list(md["tokenizer.ggml.scores"])
    scores[tid(md, "bc")] = -0.5
    md = tiny_vocab(add_space_prefix=False, tokens=tokens, scores=scores)
    assert Tokenizer.from_metadata(md).encode("abc", add_special=False) == [tid(md, "a"), tid(md, "bc")]


def test_equal_scores_merge_the_leftmost_pair():
    """Competing pairs of equal score: llama.cpp's work queue takes the leftmost one (its comparator
    orders by score, then by position), whatever the tokens' ids. llama.cpp (llama-cpp-python
    0.3.36) gives these results on a GGUF with the same normal tokens and scores; ranking equal
    scores by id would give a + bc for "abc"."""
    base = tiny_vocab()
    tokens = base["tokenizer.ggml.tokens"][:261] + ["a", "b", "c", "bc", "ab"]      # "bc" has the lower id
    types = base["tokenizer.ggml.token_type"][:261] + [1] * 5
    scores = [0.0] * 261 + [-1.0, -2.0, -3.0, -5.0, -5.0]
    md = tiny_vocab(add_space_prefix=False, tokens=tokens, token_type=types, scores=scores)
    tk = Tokenizer.from_metadata(md)
    vocab = {t: i for i, t in enumerate(tokens)}
    for text, want in [("abc", ["ab", "c"]), ("abcbc", ["ab", "c", "bc"]), ("cabc", ["c", "ab", "c"])]:
        ids = tk.encode(text, add_special=False)
        assert ids == [vocab[t] for t in want] == spm_merge_loop(text, tokens, scores, vocab)


@pytest.mark.parametrize("changes, message", [
    ({"scores": [0.0] * 3}, "tokenizer.ggml.scores"),
    ({"scores": "nope"}, "tokenizer.ggml.scores"),
    ({"add_space_prefix": "yes"}, "tokenizer.ggml.add_space_prefix"),
])
def test_bad_spm_metadata_is_a_model_file_error(changes, message):
    with pytest.raises(ModelFileError, match=message):
        Tokenizer.from_metadata(tiny_vocab(**changes), "bad.gguf")
