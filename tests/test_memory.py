"""Loading maps the file; it does not dequantize or copy the model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from conftest import micro_path, smollm2_path

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


def test_peak_rss_close_to_file_size_plus_kv_cache():
    model = smollm2_path()
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(model), str(micro_path("llama-micro-q4_0"))],
                         capture_output=True, text=True, timeout=300, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    file_mb = model.stat().st_size / 2**20
    assert res["peak_delta_mb"] <= 1.15 * file_mb + res["kv_mb"], res
