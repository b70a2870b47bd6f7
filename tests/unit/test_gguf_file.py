"""GGUFFile: metadata arrays stay views of the file until a caller asks for lists."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader

from rosenblatt import Engine, ModelFileError
from rosenblatt.gguf.file import GGUFFile, StringArray, read_metadata

from support import micro_path

SRC = micro_path("qwen2-micro-q8_0")


def test_raw_metadata_arrays_are_views_equal_to_the_lists():
    g = GGUFFile(SRC)
    raw = g.raw_metadata
    tokens, merges, types = raw["tokenizer.ggml.tokens"], raw["tokenizer.ggml.merges"], raw["tokenizer.ggml.token_type"]
    assert isinstance(tokens, StringArray) and isinstance(merges, StringArray)
    assert isinstance(types, np.ndarray) and not types.flags.writeable
    assert not g.metadata_built                  # nothing turned into lists yet
    stock = GGUFReader(SRC).fields
    assert list(tokens) == [str(bytes(stock["tokenizer.ggml.tokens"].parts[i]), "utf-8")
                            for i in stock["tokenizer.ggml.tokens"].data]
    md = read_metadata(SRC)
    assert g.metadata == md and isinstance(md["tokenizer.ggml.tokens"], list)
    assert list(tokens) == md["tokenizer.ggml.tokens"] and list(merges) == md["tokenizer.ggml.merges"]
    assert types.tolist() == md["tokenizer.ggml.token_type"]


def test_get_returns_plain_values_without_building_the_metadata_dict():
    g = GGUFFile(SRC)
    assert g.get("tokenizer.ggml.tokens") == read_metadata(SRC)["tokenizer.ggml.tokens"]
    assert g.get("no.such.key", 7) == 7 and g.get_str("general.architecture") == "qwen2"
    assert not g.metadata_built


def test_string_array_indexing():
    tokens = GGUFFile(SRC, load_tensors=False).raw_metadata["tokenizer.ggml.tokens"]
    plain = list(tokens)
    n = len(tokens)
    assert [tokens[i] for i in (0, 1, n - 1, -1, -n)] == [plain[i] for i in (0, 1, n - 1, -1, -n)]
    assert tokens[5:12] == plain[5:12] and tokens[::-97] == plain[::-97]
    assert tokens[np.int64(3)] == plain[3]
    assert (tokens.lengths() == [len(t.encode("utf-8")) for t in plain]).all()
    for bad in (n, -n - 1):
        with pytest.raises(IndexError):
            tokens[bad]


def test_invalid_utf8_in_a_string_array_is_refused_at_open(tmp_path):
    data = bytearray(SRC.read_bytes())
    g = GGUFFile(SRC, load_tensors=False)
    tokens = g.raw_metadata["tokenizer.ggml.tokens"]
    i = next(i for i in range(len(tokens)) if len(tokens[i]) > 3 and tokens[i].isascii())
    needle = len(tokens[i]).to_bytes(8, "little") + tokens[i].encode()
    at = data.index(needle) + 8
    data[at] = 0xFF
    p = tmp_path / "bad-utf8.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="malformed"):
        GGUFFile(p)


def test_engine_reads_token_texts_after_evicting_the_header():
    e = Engine.load(SRC, n_ctx=32)
    assert not e.gguf.metadata_built         # loading built no lists of the vocabulary
    md = read_metadata(SRC)
    assert [e.tokenizer.id_to_token(i) for i in range(e.tokenizer.vocab_size)] == md["tokenizer.ggml.tokens"]
    e.gguf.evict_metadata_pages()           # again: harmless
    text = "Hello world"
    assert e.detokenize(e.tokenize(text, add_special=False)) == text
    assert e.gguf.metadata == md            # the full dict can still be built after loading


def test_the_private_reader_hooks_we_override_are_still_there(monkeypatch):
    """gguf/file.py overrides four private methods of gguf's GGUFReader (_get, _get_field_parts,
    _get_tensor_info_field, _build_tensors) and pyproject pins gguf to the range tested. A gguf release that renames
    them or changes their parameters, or stops calling them, fails here, not in a user's load."""
    import inspect
    import tomllib
    from importlib.metadata import version
    from pathlib import Path

    from packaging.requirements import Requirement

    from rosenblatt.gguf import file as gguf_file

    spec = next(Requirement(r) for r in tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
                ["project"]["dependencies"] if Requirement(r).name == "gguf")
    assert spec.specifier and version("gguf") in spec.specifier, (version("gguf"), str(spec.specifier))
    expected = {"_get": ["self", "offset", "dtype", "count", "override_order"],
                "_get_field_parts": ["self", "orig_offs", "raw_type"],
                "_get_tensor_info_field": ["self", "orig_offs"],
                "_build_tensors": ["self", "start_offs", "fields"]}
    for name, params in expected.items():
        assert list(inspect.signature(getattr(GGUFReader, name)).parameters) == params, name
        assert name in vars(gguf_file._CheckedReader), name
    calls = []
    for name in expected:
        ours = getattr(gguf_file._CheckedReader, name)
        monkeypatch.setattr(gguf_file._CheckedReader, name,
                            lambda self, *a, _f=ours, _n=name, **k: (calls.append(_n), _f(self, *a, **k))[1])
    GGUFFile(micro_path("qwen2-micro-q4_k_m"))
    assert set(calls) == set(expected), sorted(set(calls))
