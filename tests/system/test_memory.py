"""Loading maps the file; it does not dequantize or copy the model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rosenblatt.backends.cpu import _drop_pages

from support import gemma3_path, micro_path, smollm2_path

SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from rosenblatt import Engine
    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Engine.load(sys.argv[2], n_ctx=64).eval([1, 2, 3])        # imports and kernels, before measuring
    base = peak_mb()
    e = Engine.load(sys.argv[1], n_ctx=512)
    e.eval(list(range(1, 200)), logits="last")
    print(json.dumps({"peak_delta_mb": peak_mb() - base, "kv_mb": e.cache.nbytes / 2**20}))
""")


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
@pytest.mark.slow
def test_peak_rss_close_to_file_size_plus_kv_cache(which):
    """SmolLM2 (Q4_1: read in place from the mapping) and gemma3 (Q4_K_M: on x86 its Q4_K
    matrices are repacked at load, and the file's pages of them let go)."""
    model = smollm2_path() if which == "smollm2" else gemma3_path()
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(model), str(micro_path("llama-micro-q4_0"))],
                         capture_output=True, text=True, timeout=300, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    file_mb = model.stat().st_size / 2**20
    assert res["peak_delta_mb"] <= 1.15 * file_mb + res["kv_mb"], res


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_kv_cache_commits_memory_only_for_written_positions():
    import numpy as np

    from rosenblatt.models.kv_cache import KVCache, SlidingWindowKVCache
    for make in (lambda: KVCache(8, 2, 32768, 128, 128),
                 lambda: SlidingWindowKVCache(8, 2, 32768, 128, 128, [0, 4096] * 4)):
        before = _rss_mb()
        cache = make()
        assert cache.nbytes >= 8 * 2 * 2 * 4096 * 128 * 4        # >= 128 MiB reserved
        assert all(not a.any() for a in cache.k[:1] + cache.v[:1])  # reads as zeros (reading commits nothing)
        rng = np.random.default_rng(0)
        for layer in range(8):
            k = rng.standard_normal((16, 2, 128)).astype(np.float32)
            kc, vc = cache.store(layer, 0, k, -k)
            assert np.array_equal(kc[:, :16], k.transpose(1, 0, 2)) and np.array_equal(vc[:, :16], -k.transpose(1, 0, 2))
        grown = _rss_mb() - before
        # 16 positions x 8 layers x k,v x 2 heads: a page per head and array, ~0.1 MiB; reading
        # the first arrays maps the shared zero page. Eager zeroing would be >= 128 MiB.
        assert grown < 16, (make, grown)
        del cache, kc, vc


def test_dropping_pages_keeps_the_data(tmp_path):
    """Pages of the model file's mapping leave the resident set and read back the same; an
    anonymous array (whose pages would be lost) is left alone."""
    data = np.random.default_rng(0).integers(0, 256, 1 << 22, dtype=np.uint8)
    path = tmp_path / "blob"
    data.tofile(path)
    mapped = np.memmap(path, mode="r")
    part = slice(12345, 12345 + 7 * 500_000)
    view = mapped[part].reshape(-1, 7)[:, :5]      # a strided view well inside the mapping
    assert np.array_equal(view, data[part].reshape(-1, 7)[:, :5])
    _drop_pages(mapped[part])
    assert np.array_equal(np.asarray(view), data[part].reshape(-1, 7)[:, :5])
    anon = data.copy()
    _drop_pages(anon)
    assert np.array_equal(anon, data)
