"""`bench --json` smoke test on a tiny fixture (benchmarks are measured, never asserted on time)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import micro_path

FIELDS = ("prefill_tok_s", "decode_tok_s", "ttft_s", "load_s", "peak_rss_mb", "threads", "model", "device")


def test_bench_json_emits_every_field():
    out = subprocess.run([sys.executable, "-m", "rosenblatt", "bench", "--model", str(micro_path("qwen2-micro-q4_k_m")),
                          "--prompt-tokens", "16", "--gen-tokens", "4", "--repeat", "2", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    for key in FIELDS:
        assert key in res, key
    assert res["model"] == "qwen2-micro-q4_k_m.gguf" and res["device"] == "cpu" and res["threads"] >= 1
    from rosenblatt import cpu as simd
    assert res["isa"] == simd.host_isa() and isinstance(res["cpu_features"], list)
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_s", "load_s", "peak_rss_mb"):
        assert isinstance(res[key], float) and res[key] > 0, key
    assert res["decode_tok_s_empty"] > 0
    lo, hi = res["decode_tok_s_range"]
    assert lo <= res["decode_tok_s"] <= hi
    assert isinstance(res["decode_step_s"], float) and res["decode_step_s"] > 0
    split = res["decode_step_split_s"]
    assert {"matmul", "attention", "norms/rope/act", "sampling", "python/other", "total"} <= set(split)
    assert abs(sum(v for k, v in split.items() if k != "total") - split["total"]) < 1e-6 + 0.01 * split["total"]


def test_bench_batch_reports_the_aggregate_and_the_single_sequence_rate():
    out = subprocess.run([sys.executable, "-m", "rosenblatt", "bench", "--model", str(micro_path("qwen2-micro-q4_k_m")),
                          "--prompt-tokens", "8", "--gen-tokens", "4", "--repeat", "1", "--batch", "3", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["batch"] == 3
    assert res["decode_tok_s"] > 0 and res["decode_tok_s_single"] > 0
    assert res["decode_tok_s"] != res["decode_tok_s_single"]      # two measurements, not one copied


def test_batched_decode_generates_what_each_sequence_generates_alone():
    from rosenblatt import Engine
    from rosenblatt.bench import batched_decode
    engine = Engine.load(micro_path("llama-micro-q8_0"), n_ctx=64)
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]]
    _, together = batched_decode(engine, prompts, 6)
    for p, ids in zip(prompts, together):
        engine.reset()
        engine.generate(p, max_new_tokens=6, temperature=0, ignore_eos=True)
        assert engine.stats.tokens == ids


def test_bench_predict_json_needs_no_model_and_returns_the_prediction():
    out = subprocess.run([sys.executable, "-m", "rosenblatt", "bench", "--device", "npu-sim", "--predict", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    pred = json.loads(out.stdout)["predict"]
    assert {"model", "prompts", "crossover", "constants", "anchor_check", "clocks_hz", "lm_head_cpu_s"} <= set(pred)
    assert pred["model"] == "Qwen2.5-1.5B" and pred["clocks_hz"] == [200_000_000, 1_000_000_000]
    assert [p["prompt_tokens"] for p in pred["prompts"]] == [128, 512]
    for p in pred["prompts"]:
        assert set(p["per_matmul"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert {"per_matmul", "layer", "prompt", "tok_s"} <= set(p)
        assert set(p["tok_s"]["npu"]) == {"200MHz", "1000MHz"} and p["tok_s"]["cpu"] > 0
        for row in p["per_matmul"].values():
            assert row["cpu_s"] > 0 and all(row["npu"][c]["seconds"] > 0 for c in ("200MHz", "1000MHz"))
    assert set(pred["crossover"]["q_proj"]["tokens"]) == {"200MHz", "1000MHz"}
    text = subprocess.run([sys.executable, "-m", "rosenblatt", "bench", "--device", "npu-sim", "--predict"],
                          capture_output=True, text=True, timeout=300)
    assert text.returncode == 0 and "crossover" in text.stdout and "tok/s" in text.stdout


def test_bench_depth_times_prefill_and_decode_after_that_many_cached_tokens(monkeypatch):
    """--depth D (llama-bench's -d): each timed generation starts with D tokens in the cache, which
    it reuses as a prefix; only the prompt (or the empty decode's one token) is evaluated."""
    from rosenblatt.bench import run_bench
    from rosenblatt.engine import Engine
    seen = []
    responses = Engine.responses

    def spy(self, prompt, *a, **kw):
        last = None
        for last in responses(self, prompt, *a, **kw):
            yield last
        seen.append((last.stats.prompt_tokens, last.stats.cached_tokens))
    monkeypatch.setattr(Engine, "responses", spy)
    res = run_bench(str(micro_path("qwen2-micro-q4_k_m")), prompt_tokens=8, gen_tokens=4, repeat=2, depth=24)
    assert res["depth"] == 24 and res["prefill_tok_s"] > 0 and res["decode_tok_s_empty"] > 0
    # the warm-up (8 tokens, empty cache), two prompt rounds, two "empty" decode rounds
    assert seen == [(8, 0)] + [(32, 24)] * 2 + [(25, 24)] * 2
    seen.clear()
    run_bench(str(micro_path("qwen2-micro-q4_k_m")), prompt_tokens=8, gen_tokens=4, repeat=1)
    assert seen == [(8, 0), (8, 0), (1, 0)]


def test_bench_vs_llamacpp_names_a_crashed_llama_bench(tmp_path):
    """A llama-bench killed by a signal (ggml's AMX prompt kernels fault in some KVM guests) is
    reported by the signal's name, with the way to a build without AMX, not as a bare exit code."""
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/bin/sh\nulimit -c 0\nkill -SEGV $$\n")      # no core file left behind
    fake.chmod(0o755)
    script = Path(__file__).resolve().parents[2] / "scripts" / "bench-vs-llamacpp"
    proc = subprocess.run([sys.executable, str(script), "--model", str(micro_path("qwen2-micro-q4_k_m")),
                           "--llama-bench", str(fake), "--repeat", "1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "killed by SIGSEGV" in proc.stderr and "build-llama-bench --no-amx" in proc.stderr
