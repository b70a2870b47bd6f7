"""Bad model files give one ModelFileError naming the file and the field or tensor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from rosenblatt import Engine, ModelFileError

from support import micro_path, rewrite

SRC = micro_path("qwen2-micro-q8_0")


def expect_error(path, *fragments):
    with pytest.raises(ModelFileError) as ei:
        Engine.load(path, n_ctx=32)
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg, msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


def test_rewrite_helper_roundtrip(tmp_path):
    p = rewrite(SRC, tmp_path / "same.gguf")
    a = Engine.load(SRC, n_ctx=32).logits([1, 2, 3])
    b = Engine.load(p, n_ctx=32).logits([1, 2, 3])
    assert np.array_equal(a, b)


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.gguf", "cannot open")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "text.gguf"
    p.write_text("hello, I am not a model\n")
    expect_error(p, "not a GGUF")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    expect_error(p, "not a GGUF")


@pytest.mark.parametrize("cut", [8, 100, 5000, 1_000_000])
def test_truncated(tmp_path, cut):
    p = tmp_path / "cut.gguf"
    p.write_bytes(SRC.read_bytes()[:cut])
    expect_error(p)


def test_tensor_data_past_end_names_the_tensor(tmp_path):
    data = SRC.read_bytes()
    p = tmp_path / "short.gguf"
    p.write_bytes(data[:-1000])
    last = max(GGUFReader(SRC).tensors, key=lambda t: t.data_offset).name
    expect_error(p, f"tensor {last!r}", "past the end")


def test_unknown_architecture(tmp_path):
    p = rewrite(SRC, tmp_path / "a.gguf", meta={"general.architecture": (GGUFValueType.STRING, "gptj")})
    expect_error(p, "general.architecture", "gptj")


@pytest.mark.parametrize("key,value,fragment", [
    ("qwen2.attention.head_count", 0, "below the minimum"),
    ("qwen2.attention.head_count_kv", 3, "does not divide"),
    ("qwen2.block_count", 10**6, "above the maximum"),
    ("qwen2.embedding_length", 300, "token_embd"),
])
def test_absurd_metadata(tmp_path, key, value, fragment):
    p = rewrite(SRC, tmp_path / "m.gguf", meta={key: (GGUFValueType.UINT32, value)})
    expect_error(p, fragment)


def test_metadata_of_wrong_type(tmp_path):
    p = rewrite(SRC, tmp_path / "t.gguf", meta={"qwen2.block_count": (GGUFValueType.STRING, "two")})
    expect_error(p, "qwen2.block_count", "integer")


def test_missing_metadata(tmp_path):
    p = rewrite(SRC, tmp_path / "k.gguf", drop_meta=("qwen2.embedding_length",))
    expect_error(p, "qwen2.embedding_length", "missing")


def test_missing_tensor(tmp_path):
    p = rewrite(SRC, tmp_path / "t.gguf", drop_tensors=("blk.1.ffn_up.weight",))
    expect_error(p, "blk.1.ffn_up.weight", "missing")


def test_wrong_tensor_shape(tmp_path):
    p = rewrite(SRC, tmp_path / "s.gguf", tensors={"blk.0.attn_q.weight": (np.zeros((200, 256), np.float32), None)})
    expect_error(p, "blk.0.attn_q.weight", "[256, 200]", "expected [256, 256]")


def test_unsupported_tensor_type(tmp_path):
    blocks = np.zeros((256, 256 // 32 * 18), np.uint8)   # IQ4_NL: 32-element blocks of 18 bytes
    p = rewrite(SRC, tmp_path / "u.gguf",
                tensors={"blk.0.attn_q.weight": (blocks, GGMLQuantizationType.IQ4_NL)})
    expect_error(p, "blk.0.attn_q.weight", "IQ4_NL", "not supported")


def test_unknown_tensor_type_code(tmp_path):
    data = bytearray(SRC.read_bytes())
    name = b"blk.0.attn_q.weight"
    i = data.index(name) + len(name)
    n_dims = int.from_bytes(data[i:i + 4], "little")
    type_at = i + 4 + 8 * n_dims
    data[type_at:type_at + 4] = (200).to_bytes(4, "little")
    p = tmp_path / "code.gguf"
    p.write_bytes(bytes(data))
    expect_error(p, "blk.0.attn_q.weight", "unknown tensor type code 200")


def test_source_file_is_never_modified(tmp_path):
    before = SRC.stat().st_mtime_ns, SRC.read_bytes()
    Engine.load(SRC, n_ctx=32).logits([1, 2])
    assert (SRC.stat().st_mtime_ns, SRC.read_bytes()) == before


MUTATION_SCRIPT = textwrap.dedent("""
    import json, sys, tracemalloc, numpy as np
    from rosenblatt import Engine, ModelFileError
    from gguf import GGUFReader
    from gguf.quants import dequantize
    src, workdir, n, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    original = open(src, 'rb').read()
    data_start = GGUFReader(src).data_offset
    rng = np.random.default_rng(seed)
    Engine.load(src, n_ctx=8).logits([1, 2, 3])   # compile/load the kernels before measuring

    def repacked(e):
        # bytes of the weights' copies in a packed kernel's layout (x86): the one allocation of a
        # load that legitimately scales with the file (the file's own pages are let go instead)
        ws = {id(w): w for L in e.model.layers for w in vars(L).values()}
        ws.update({id(w): w for w in vars(e.model).values()})
        return sum(w.packed.data.nbytes + 64 for w in ws.values() if getattr(w, 'packed', None) is not None)

    results = {'loaded': 0, 'refused': 0, 'nonfinite_with_bad_weights': 0, 'max_alloc_ratio': 0.0}
    for i in range(n):
        buf = bytearray(original)
        kind = i % 3
        if kind == 0:
            buf = buf[:int(rng.integers(0, len(buf)))]
        else:
            # flips land in the header (metadata + tensor infos) two times out of three
            hi = data_start if kind == 1 else len(buf)
            for pos in rng.integers(0, hi, size=int(rng.integers(1, 9))):
                buf[pos] ^= 1 << int(rng.integers(0, 8))
        path = f"{workdir}/m{i}.gguf"
        open(path, 'wb').write(bytes(buf))
        tracemalloc.start()
        try:
            e = Engine.load(path, n_ctx=8)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            results['max_alloc_ratio'] = max(results['max_alloc_ratio'], (peak - repacked(e)) / len(buf))
            out = e.logits([1, 2, 3])
            results['loaded'] += 1
            if not np.isfinite(out).all():
                # acceptable only when the flipped bytes made a weight non-finite
                r = GGUFReader(path)
                bad = any(not np.isfinite(np.asarray(dequantize(t.data, t.tensor_type))).all() for t in r.tensors)
                assert bad, f"mutation {i}: non-finite logits from finite weights"
                results['nonfinite_with_bad_weights'] += 1
        except ModelFileError as err:
            tracemalloc.stop()
            assert '\\n' not in str(err)
            results['refused'] += 1
    print(json.dumps(results))
""")


@pytest.mark.slow
@pytest.mark.parametrize("src", ["qwen2-micro-q4_k_m", "llama-micro-q4_0"])
@pytest.mark.slow
def test_mutated_files_load_or_refuse_cleanly(tmp_path, src):
    """>= 200 truncated/bit-flipped copies: each loads and runs, or raises ModelFileError;
    no crash, no hang (subprocess with a time limit), and loading allocates less than the file size
    beside the weights' repacked copies (x86's packed kernels; their exact bytes are subtracted)."""
    proc = subprocess.run([sys.executable, "-c", MUTATION_SCRIPT, str(micro_path(src)), str(tmp_path), "120", "11"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["loaded"] + res["refused"] == 120
    assert res["refused"] >= 40 and res["loaded"] >= 10, res
    assert res["max_alloc_ratio"] < 1.0, res


def test_broken_chat_template_loads_but_chat_names_the_field(tmp_path):
    p = rewrite(SRC, tmp_path / "tpl.gguf",
                meta={"tokenizer.chat_template": (GGUFValueType.STRING, "{% if messages %}{{ oops }")})
    e = Engine.load(p, n_ctx=32)
    assert e.logits([1, 2]).shape == (2, e.config.vocab_size)
    # plain generation does not use the template: the same text as the untouched file's
    assert e.generate("hi", max_new_tokens=2, temperature=0) == \
        Engine.load(SRC, n_ctx=32).generate("hi", max_new_tokens=2, temperature=0)
    with pytest.raises(ModelFileError, match="tokenizer.chat_template"):
        e.chat([{"role": "user", "content": "hi"}])


def test_bad_tokenizer_metadata_is_a_model_file_error(tmp_path):
    p = rewrite(SRC, tmp_path / "tok.gguf", meta={"tokenizer.ggml.pre": (GGUFValueType.STRING, "no-such-pre")})
    expect_error(p, "no-such-pre")


STRUCTURED_SCRIPT = textwrap.dedent("""
    import json, struct, sys, time, tracemalloc
    import numpy as np
    from rosenblatt import Engine, ModelFileError
    src, workdir = sys.argv[1], sys.argv[2]
    data = open(src, 'rb').read()
    u32 = lambda o: struct.unpack_from('<I', data, o)[0]
    u64 = lambda o: struct.unpack_from('<Q', data, o)[0]
    SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    fields, bounds = [('tensor count', 8, 8), ('metadata count', 16, 8)], [4, 8, 16, 24]

    def value(o, t, where):
        if t == 8:                                          # string: u64 length, bytes
            fields.append((where + ' string length', o, 8))
            return o + 8 + u64(o)
        if t == 9:                                          # array: item type, count, items
            fields.append((where + ' array item type', o, 4)); fields.append((where + ' array count', o + 4, 8))
            it, n = u32(o), u64(o + 4)
            o += 12
            if it in SIZES:
                return o + n * SIZES[it]
            for k in range(n):                              # the first items' fields, then skip
                start = len(fields)
                o = value(o, it, where + f'[{k}]')
                if k >= 2:
                    del fields[start:]
            return o
        return o + SIZES[t]

    # the file's structure, read independently of any GGUF library
    o = 24
    for i in range(u64(16)):
        fields.append((f'metadata {i} key length', o, 8)); o += 8 + u64(o)
        fields.append((f'metadata {i} type', o, 4)); t = u32(o); o += 4
        o = value(o, t, f'metadata {i}'); bounds.append(o)
    for i in range(u64(8)):
        fields.append((f'tensor {i} name length', o, 8)); o += 8 + u64(o)
        fields.append((f'tensor {i} dims', o, 4)); nd = u32(o); o += 4
        for d in range(nd):
            fields.append((f'tensor {i} dim {d}', o, 8)); o += 8
        fields.append((f'tensor {i} type', o, 4)); o += 4
        fields.append((f'tensor {i} offset', o, 8)); o += 8
        bounds.append(o)

    cases = []
    for b in bounds:                                        # truncated at and around every boundary
        for cut in (b - 1, b, b + 1):
            cases.append((f'truncated at {cut}', data[:cut]))
    for name, off, width in fields:                         # counts, lengths, types set to absurd values
        values = (2**64 - 1, 2**63 + 1, 2**32 + 7, len(data)) if width == 8 else (2**32 - 1, 255, 13)
        for v in values:
            buf = bytearray(data)
            buf[off:off + width] = v.to_bytes(width, 'little')
            cases.append((f'{name} = {v}', bytes(buf)))

    # a first pass compiles every code path a mutation can reach (numba compiles on first use:
    # seconds and tens of MB once per process, not per file); the second pass is measured
    for i, (name, buf) in enumerate(cases):
        path = f'{workdir}/c{i}.gguf'
        open(path, 'wb').write(buf)
        try:
            Engine.load(path, n_ctx=8).logits([1, 2, 3])
        except ModelFileError:
            pass
    out = {'cases': len(cases), 'loaded': 0, 'refused': 0, 'max_seconds': 0.0, 'max_growth': 0.0, 'slowest': '', 'biggest': ''}
    for i, (name, buf) in enumerate(cases):
        path = f'{workdir}/c{i}.gguf'
        open(path, 'wb').write(buf)
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            e = Engine.load(path, n_ctx=8)
            logits = e.logits([1, 2, 3])
            out['loaded'] += 1
            assert np.isfinite(logits).all(), name
        except ModelFileError as err:
            msg = str(err)
            assert '\\n' not in msg and path in msg, (name, msg)
            out['refused'] += 1
        seconds = time.perf_counter() - t0
        if seconds > out['max_seconds']:
            out['max_seconds'], out['slowest'] = seconds, name
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        if peak / len(data) > out['max_growth']:
            out['max_growth'], out['biggest'] = peak / len(data), name
    print(json.dumps(out))
""")


@pytest.mark.parametrize("src", ["qwen2-micro-q4_k_m", "llama-micro-q4_0"])
@pytest.mark.slow
def test_structured_corpus_is_refused_fast_and_small(tmp_path, src):
    """Every header field of a real file set to absurd values (2**64 - 1, 2**63 + 1, 2**32 + 7, the
    file's size; bad type codes) and the file cut at and around every record boundary: each case
    loads and gives finite logits, or is one ModelFileError line naming the file, within 2 s and
    with the memory it allocates under twice the file's size (a count of 2**64 - 1 used to walk
    millions of empty records for minutes). Measured on a second pass over the corpus: the first
    compiles whatever code path a mutation reaches (numba compiles once per process)."""
    proc = subprocess.run([sys.executable, "-c", STRUCTURED_SCRIPT, str(micro_path(src)), str(tmp_path)],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["cases"] > 300 and res["refused"] > 200, res
    assert res["max_seconds"] < 2.0, res
    assert res["max_growth"] < 2.0, res


def test_embedding_length_not_a_multiple_of_the_heads_says_so(tmp_path):
    p = rewrite(SRC, tmp_path / "e.gguf", meta={"qwen2.embedding_length": (GGUFValueType.UINT32, 250)},
                drop_meta=("qwen2.attention.key_length", "qwen2.attention.value_length"))
    expect_error(p, "qwen2.embedding_length", "not a multiple of the head count")


def test_nan_norm_weight_is_named_at_load(tmp_path):
    norm = np.full(256, np.nan, np.float32)
    p = rewrite(SRC, tmp_path / "n.gguf", tensors={"blk.0.attn_norm.weight": (norm, None)})
    expect_error(p, "blk.0.attn_norm.weight", "NaN")


def test_nan_scales_in_a_matrix_are_named_instead_of_giving_noise(tmp_path):
    """A Q8_0 block scale set to NaN: the first forward (the load's warm-up) names the tensor,
    instead of the int8 path turning the NaN activations into finite noise (as it did)."""
    r = GGUFReader(SRC)
    t = next(t for t in r.tensors if t.name == "blk.0.ffn_down.weight")
    blocks = np.array(t.data, np.uint8).reshape(-1, 34)
    blocks[3, 0:2] = np.array([np.nan], np.float16).view(np.uint8)
    p = rewrite(SRC, tmp_path / "s.gguf", tensors={t.name: (blocks.reshape(t.data.shape), t.tensor_type)})
    expect_error(p, "blk.0.ffn_down.weight", "NaN")
