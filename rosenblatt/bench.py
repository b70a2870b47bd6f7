"""`python -m rosenblatt bench`: load time, time to first token, prefill and decode speed, RSS.

The benchmark drives the same path as chat and ``Engine.generate`` (``Engine.stream`` with
greedy sampling and end-of-generation ignored, like llama-bench), on a prompt of random token
ids, ``repeat`` times; timings are medians with min/max. One extra decode step runs op by op
with timed wrappers of the model's stage functions (:func:`timed_ops`), to split a token's time
into matmuls, attention, norms/RoPE and activations, sampling, and the Python that glues them.
"""

from __future__ import annotations

import os
import resource
import statistics
import time

import numpy as np

from .sampling import Sampler, SamplingParams


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _stat(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def prompt_ids(engine, n: int, seed: int = 0) -> list[int]:
    """n random ordinary token ids (no end-of-generation or control tokens)."""
    from .text.tokenizer import TokenAttr
    tok = engine.tokenizer
    vocab = np.arange(engine.config.vocab_size)
    if tok is not None:
        attrs = tok.token_attrs()[:vocab.size]
        vocab = vocab[:attrs.size][(attrs & int(TokenAttr.NORMAL | TokenAttr.BYTE)) != 0]
    if vocab.size == 0:
        raise ValueError(f"{engine.path}: no ordinary tokens to build a benchmark prompt from")
    return [int(t) for t in np.random.default_rng(seed).choice(vocab, size=n)]


def decode_step_time(engine, context: list[int], steps: int = 4) -> float:
    """Median seconds of one decode step after ``context`` as generation runs it (the fused
    one-call step where it applies), sampling excluded. The cache must hold ``context[:-1]``."""
    times = []
    for _ in range(steps):
        engine.truncate(len(context) - 1)
        t0 = time.perf_counter()
        engine.eval(context[-1:], logits="last")
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


#: the stage each of a model's stage functions (``stage_ops()``, in order) counts towards
STAGES = ("matmul", "matmul", "attention", "norms/rope/act", "norms/rope/act", "norms/rope/act")


def timed_ops(ops, seconds: dict):
    """Wrappers of a model's stage functions that add the seconds each call takes to
    ``seconds[stage]`` (the profiler: the model itself has no timing in it)."""
    def timed(fn, stage):
        def run(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - t0
            return out
        return run
    return tuple(timed(f, s) for f, s in zip(ops, STAGES))


def decode_step_profile(engine, context: list[int]) -> dict:
    """Seconds per stage of one decode step after ``context``, run op by op with timed stage
    functions (the stages need their boundaries, so a fused step is not used here). The cache
    must hold ``context[:-1]``."""
    model = engine.model
    token = np.asarray(context[-1:], dtype=np.int64)
    sampler = Sampler(SamplingParams(temperature=0))
    engine.truncate(len(context) - 1)
    model.forward(token, engine.cache, "last", ops=timed_ops(model.stage_ops(), {}))   # loads that path's kernels
    engine.truncate(len(context) - 1)
    prof = {}
    t0 = time.perf_counter()
    logits = model.forward(token, engine.cache, "last", ops=timed_ops(model.stage_ops(), prof))[0]
    t1 = time.perf_counter()
    sampler(logits, context)
    t2 = time.perf_counter()
    split = dict(prof)
    split["sampling"] = t2 - t1
    split["python/other"] = max(0.0, (t1 - t0) - sum(prof.values()))
    split["total"] = t2 - t0
    return split


def batched_decode(engine, prompts: list[list[int]], gen_tokens: int) -> tuple[float, list[list[int]]]:
    """Seconds of ``gen_tokens`` greedy decode steps of len(prompts) sequences run together
    (:meth:`LlamaModel.forward_batch`, one call a step for all of them), after each prompt's
    prefill; and each sequence's generated ids."""
    model = engine.model
    caches = model.new_caches(len(prompts))
    nxt = []
    for p, c in zip(prompts, caches):
        nxt.append(int(np.argmax(model.forward(np.asarray(p), c, logits="last")[0])))
    out = [[t] for t in nxt]
    t0 = time.perf_counter()
    for _ in range(gen_tokens - 1):
        nxt = [int(t) for t in np.argmax(model.forward_batch(nxt, caches), axis=1)]
        for o, t in zip(out, nxt):
            o.append(t)
    return time.perf_counter() - t0, out


def run_bench(model: str, prompt_tokens: int = 128, gen_tokens: int = 64, threads: int | None = None,
              device: str = "cpu", repeat: int = 3, n_ctx: int | None = None, progress=None, batch: int = 1,
              depth: int = 0) -> dict:
    """The measurements of ``bench``. ``depth`` > 0: the prefill, decode and empty-decode figures
    are taken with ``depth`` tokens already in the context (as ``llama-bench -d``): the prompt's
    ``prompt_tokens`` come after them, and "empty" decode starts right after them."""
    from .engine import Engine
    t0 = time.perf_counter()
    engine = Engine.load(model, device=device, n_ctx=n_ctx or (depth + prompt_tokens + gen_tokens + 8), threads=threads)
    load_s = time.perf_counter() - t0
    ids = prompt_ids(engine, prompt_tokens)
    ctx = prompt_ids(engine, depth, seed=1000) if depth else []
    engine.generate(ids[:8], max_new_tokens=2, temperature=0)       # warm-up: compile / load cached kernels

    def start():            # an empty cache, or the depth's tokens in it (untimed; then reused as a prefix)
        engine.reset()
        if ctx:
            engine.prefill(ctx)

    prefill, decode, ttft = [], [], []
    for r in range(repeat):
        start()
        for r in engine.responses(ctx + ids, max_new_tokens=gen_tokens, temperature=0, ignore_eos=True):
            st = r.stats
        prefill.append(st.prefill_tok_s)
        decode.append(st.decode_tok_s)
        ttft.append(st.ttft_s)
        if progress:
            progress(r + 1, repeat)
    # decode as llama-bench's tg test runs it: gen_tokens steps from an (almost) empty context,
    # here one prompt token, so attention reads no prompt (the figure above follows the prompt);
    # with a depth, right after the depth's tokens
    empty = []
    for _ in range(repeat):
        start()
        for r in engine.responses(ctx + ids[:1], max_new_tokens=gen_tokens + 1, temperature=0, ignore_eos=True):
            st = r.stats
        empty.append(st.decode_tok_s)
    batched = []
    if batch > 1:
        prompts = [prompt_ids(engine, prompt_tokens, seed=1 + i) for i in range(batch)]
        batched_decode(engine, [p[:8] for p in prompts], 2)          # warm-up
        for _ in range(repeat):
            seconds, _ = batched_decode(engine, prompts, gen_tokens)
            batched.append(batch * (gen_tokens - 1) / seconds)
    engine.reset()
    npu = _npu_counts(engine)
    engine.eval(ids[:-1], logits="none")       # the context both step measurements start from
    npu = _npu_counts(engine, npu)
    step_s = decode_step_time(engine, ids)
    split = decode_step_profile(engine, ids)
    backend = engine.model.backend
    from .cpu.build import forms
    from .cpu.isa import NOTABLE, host_choice
    isa = host_choice()
    return {
        "model": os.path.basename(str(model)),
        "device": device,
        "threads": getattr(backend, "threads", threads),
        "isa": isa.isa,
        "cpu_features": [f for f in NOTABLE if f in isa.cpu.features],
        "kernel_forms": forms(),
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "depth": depth,
        "repeat": repeat,
        "load_s": load_s,
        "ttft_s": statistics.median(ttft),
        "prefill_tok_s": statistics.median(prefill),
        "batch": batch,
        "decode_tok_s": statistics.median(batched or decode),
        "decode_tok_s_single": statistics.median(decode),
        "decode_tok_s_empty": statistics.median(empty),
        "prefill_tok_s_range": [min(prefill), max(prefill)],
        "decode_tok_s_range": [min(batched or decode), max(batched or decode)],
        "ttft_s_range": [min(ttft), max(ttft)],
        "peak_rss_mb": _peak_rss_mb(),
        "file_mb": os.path.getsize(model) / 2**20,
        "kv_cache_mb": engine.cache.nbytes / 2**20,
        "decode_step_s": step_s,
        "decode_step_split_s": split,
        **npu,
    }


def _npu_counts(engine, before: dict | None = None) -> dict:
    """The NPU's SUBMITs, jobs and tasks and the model's layer passes (layers x chunks) so far;
    with ``before``, what one prefill (``prompt_tokens - 1`` rows, as generation evaluates a
    prompt) cost, and SUBMITs per layer pass and per layer of each forward call. Empty off the NPU."""
    stats = getattr(getattr(engine.model.backend, "device", None), "stats", None)
    if stats is None:
        return {}
    now = {"submits": stats.submits, "jobs": stats.jobs, "tasks": stats.tasks, "gemms": stats.calls,
           "passes": getattr(engine.model, "layer_passes", 0)}
    if before is None:
        return now
    d = {k: now[k] - before[k] for k in now}
    layers = engine.config.n_layers
    forwards = -(-engine.cache.length // engine.prefill_chunk)     # the cache holds just this prefill
    return {"npu_prefill_submits": d["submits"], "npu_prefill_jobs": d["jobs"], "npu_prefill_tasks": d["tasks"],
            "npu_prefill_gemms": d["gemms"], "npu_layer_passes": d["passes"], "npu_prefill_forwards": forwards,
            # a layer pass = one chunk of the prompt through one layer (docs/npu.md)
            "npu_submits_per_layer": d["submits"] / d["passes"] if d["passes"] else None,
            "npu_submits_per_layer_per_forward": d["submits"] / (layers * forwards) if forwards else None}


def format_report(res: dict) -> str:
    lines = [
        f"model         {res['model']}  ({res['file_mb']:.0f} MiB, device {res['device']}, {res['threads']} threads, "
        f"{res['isa']} kernels)",
        f"load          {res['load_s']:.2f} s",
        *([f"depth         {res['depth']} tokens in the context before each measurement"] if res.get("depth") else []),
        f"prefill       {res['prefill_tok_s']:.1f} tok/s  ({res['prompt_tokens']} tokens; "
        f"min {res['prefill_tok_s_range'][0]:.1f}, max {res['prefill_tok_s_range'][1]:.1f})",
        f"time to 1st   {res['ttft_s']:.3f} s",
        f"decode        {res['decode_tok_s']:.2f} tok/s  ({res['gen_tokens']} tokens; "
        f"min {res['decode_tok_s_range'][0]:.2f}, max {res['decode_tok_s_range'][1]:.2f})"
        + (f", {res['batch']} sequences together: {res['decode_tok_s'] / res['decode_tok_s_single']:.2f}x "
           f"the {res['decode_tok_s_single']:.2f} tok/s of one" if res.get("batch", 1) > 1 else ""),
        f"decode, empty {res['decode_tok_s_empty']:.2f} tok/s  (from a 1-token context, as llama-bench's tg test)",
        f"peak RSS      {res['peak_rss_mb']:.0f} MiB (file {res['file_mb']:.0f} + KV cache {res['kv_cache_mb']:.0f})",
        f"one decode step {res['decode_step_s'] * 1e3:.2f} ms as generation runs it (sampling excluded);",
        "  per stage, timed op by op (generation runs the layers in one fused call where it can):",
    ]
    split = res["decode_step_split_s"]
    total = split["total"]
    for k, v in sorted(split.items(), key=lambda kv: -kv[1]):
        if k != "total":
            lines.append(f"  {k:<16}{v * 1e3:8.2f} ms  {100 * v / total:5.1f} %")
    lines.append(f"  {'total':<16}{total * 1e3:8.2f} ms")
    if res.get("npu_submits_per_layer") is not None:
        lines.append(f"NPU prefill   {res['npu_prefill_submits']} SUBMITs, {res['npu_prefill_jobs']} jobs, "
                     f"{res['npu_prefill_tasks']} tasks for {res['npu_prefill_gemms']} products; "
                     f"{res['npu_submits_per_layer']:.2f} SUBMITs per layer pass ({res['npu_layer_passes']} = "
                     f"layers x chunks), {res['npu_submits_per_layer_per_forward']:.2f} per layer of a forward")
    return "\n".join(lines)


def format_board_table(cmp: dict) -> str:
    """This run's prefill/decode tok/s and peak RSS next to a board file's anchors and targets
    (``cmp`` is :func:`rosenblatt.fleet.compare_bench`'s dict, the JSON's ``"board"`` entry)."""
    def cell(v, fmt):
        return "-" if v is None else format(v, fmt)

    def row(label, prefill, decode, rss=None):
        return f"  {label:<40}{cell(prefill, '.1f'):>14}{cell(decode, '.2f'):>14}" \
               f"{'-' if rss is None else f'{rss:.2f} GB':>12}"

    m = cmp["measured"]
    lines = [f"board {cmp['name']}: anchors and targets are {cmp['soc']} figures for {cmp['model']}, "
             "written in the board file (not measured by this run)",
             f"  {'':<40}{'prefill tok/s':>14}{'decode tok/s':>14}{'peak RSS':>12}",
             row(f"measured here ({m['model']})", m["prefill_tok_s"], m["decode_tok_s"], m["peak_rss_gb"]),
             f"  anchor ({cmp['soc']}, from the board file):"]
    lines += [row(f"  {a['name']} ({a['kind']})", a["prefill_tok_s"], a["decode_tok_s"]) for a in cmp["anchors"]]
    lines += [row(f"target {k}", t["prefill_tok_s"], t["decode_tok_s"], t["peak_rss_gb"])
              for k, t in cmp["targets"].items()]
    if m["model"] and m["model"] != cmp["model"]:
        lines.append(f"  (this run measured {m['model']}, not {cmp['model']}: the rows do not compare like for like)")
    return "\n".join(lines)


#: the shapes the paper prediction uses (Qwen2.5-1.5B; `bench --predict` needs no model file)
QWEN25_1_5B = {"name": "Qwen2.5-1.5B", "hidden": 1536, "kv": 256, "ffn": 8960, "layers": 28, "vocab": 151936}


def prefill_matmuls(shapes: dict) -> list[tuple[str, int, int]]:
    """(name, K, N) of one layer's matmuls, in order."""
    h, kv, f = shapes["hidden"], shapes["kv"], shapes["ffn"]
    return [("q_proj", h, h), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", h, h),
            ("gate_proj", h, f), ("up_proj", h, f), ("down_proj", f, h)]


def _clock_label(hz: float) -> str:
    return f"{hz / 1e6:g}MHz"


def predict_prefill(prompt_tokens=(128, 512), clocks=None, terms: int = 2, shapes: dict = QWEN25_1_5B) -> dict:
    """Predicted prefill on the board from the paper cost model (``rosenblatt.npu.cost``): seconds
    of each matmul at each prompt length on the NPU (at each clock; the GEMM has ``terms`` rows
    per token, the npu backend's activation terms) and on the four A76 cores, per layer and for
    the whole prompt (matmuls of every layer plus the last row's lm_head on the CPU; attention,
    norms, quantization and packing are not counted), the tok/s that follow, and per matmul the
    prompt length above which the NPU wins. Nothing here is measured."""
    from .npu import cost
    from .npu import hw_assumptions as hw
    clocks = tuple(clocks or (hw.NPU_CLOCK_HZ, cost.NPU_MAX_CLOCK_HZ))
    mats = prefill_matmuls(shapes)
    layers = shapes["layers"]
    lm_head = cost.cpu_gemm_cost(1, shapes["hidden"], shapes["vocab"]).seconds
    prompts = []
    for M in prompt_tokens:
        per, layer = {}, {"cpu_s": 0.0, "cpu_q4_0_s": 0.0, "npu_s": {}, "npu_one_term_s": {}}
        for name, K, N in mats:
            c = cost.cpu_gemm_cost(M, K, N)
            c4 = cost.cpu_gemm_cost(M, K, N, efficiency=cost.CPU_EFFICIENCY_Q4_0)
            row = {"K": K, "N": N, "macs": M * K * N, "cpu_s": c.seconds, "cpu_bound": c.bound, "npu": {}}
            layer["cpu_s"] += c.seconds
            layer["cpu_q4_0_s"] += c4.seconds
            for hz in clocks:
                n = cost.npu_gemm_cost(M * terms, K, N, hz)
                one = cost.npu_gemm_cost(M, K, N, hz)
                row["npu"][_clock_label(hz)] = n.as_dict()
                lab = _clock_label(hz)
                layer["npu_s"][lab] = layer["npu_s"].get(lab, 0.0) + n.seconds
                layer["npu_one_term_s"][lab] = layer["npu_one_term_s"].get(lab, 0.0) + one.seconds
            per[name] = row
        whole = {"cpu_s": layers * layer["cpu_s"] + lm_head, "cpu_q4_0_s": layers * layer["cpu_q4_0_s"] + lm_head,
                 "npu_s": {k: layers * v + lm_head for k, v in layer["npu_s"].items()},
                 "npu_one_term_s": {k: layers * v + lm_head for k, v in layer["npu_one_term_s"].items()}}
        tok_s = {"cpu": M / whole["cpu_s"], "cpu_q4_0": M / whole["cpu_q4_0_s"],
                 "npu": {k: M / v for k, v in whole["npu_s"].items()},
                 "npu_one_term": {k: M / v for k, v in whole["npu_one_term_s"].items()}}
        prompts.append({"prompt_tokens": M, "gemm_rows_npu": M * terms, "per_matmul": per, "layer": layer,
                        "prompt": whole, "tok_s": tok_s})
    cross = {}
    for name, K, N in mats:
        cross[name] = {"K": K, "N": N,
                       "tokens": {_clock_label(hz): cost.crossover(K, N, hz, npu_rows_per_row=terms) for hz in clocks},
                       "tokens_one_term": {_clock_label(hz): cost.crossover(K, N, hz) for hz in clocks}}
    return {"model": shapes["name"], "shapes": dict(shapes), "layers": layers, "activation_terms": terms,
            "clocks_hz": list(clocks), "lm_head_cpu_s": lm_head, "constants": cost.constants(),
            "anchor_check": cost.anchor_check(), "prompts": prompts, "crossover": cross,
            "note": "paper model, nothing measured on the board; see docs/npu.md 'Predicted prefill on the board'"}


def format_prediction(pred: dict) -> str:
    """The text report of :func:`predict_prefill`."""
    labs = [_clock_label(hz) for hz in pred["clocks_hz"]]
    t = pred["activation_terms"]
    k = pred["constants"]
    lines = [f"predicted prefill of {pred['model']} on the board (a paper model: nothing here ran on an RK3588)",
             f"NPU: plan_gemm tasks, {k['npu_cores']} core, {k['npu_macs_per_cycle']} MAC/cycle, "
             f"{k['npu_task_overhead_s'] * 1e6:.0f} us/task, {k['npu_job_overhead_s'] * 1e6:.0f} us/job, "
             f"DMA {k['npu_dma_bytes_per_s'] / 1e9:g} GB/s; {t} int8 activation terms (GEMM rows = {t} x tokens)",
             f"CPU: {k['cpu_cores']} x A76 x {k['cpu_clock_hz'] / 1e9:g} GHz"
             f" x {k['cpu_sdot_macs_per_cycle']} sdot MAC/cycle"
             f" x efficiency {k['cpu_efficiency']:.3f} (llama.cpp Q8_0 anchor), or DRAM "
             f"{k['cpu_dram_bytes_per_s'] / 1e9:g} GB/s if slower",
             ""]
    for p in pred["prompts"]:
        M = p["prompt_tokens"]
        lines.append(f"M = {M} tokens: ms per matmul (one layer)")
        lines.append(f"  {'matmul':<10}{'K x N':>12}" + "".join(f"{'NPU ' + lab:>14}{'tasks':>7}" for lab in labs)
                     + f"{'CPU':>10}")
        for name, row in p["per_matmul"].items():
            cells = "".join(f"{row['npu'][lab]['seconds'] * 1e3:14.2f}{row['npu'][lab]['tasks']:7d}" for lab in labs)
            lines.append(f"  {name:<10}{str(row['K']) + 'x' + str(row['N']):>12}{cells}{row['cpu_s'] * 1e3:10.2f}")
        lay = p["layer"]
        lines.append(f"  {'layer':<10}{'':>12}" + "".join(f"{lay['npu_s'][lab] * 1e3:14.2f}{'':>7}" for lab in labs)
                     + f"{lay['cpu_s'] * 1e3:10.2f}")
        w, ts = p["prompt"], p["tok_s"]
        lines.append(f"  prompt ({pred['layers']} layers + lm_head last row on the CPU "
                     f"{pred['lm_head_cpu_s'] * 1e3:.1f} ms): "
                     + ", ".join(f"NPU {lab} {w['npu_s'][lab]:.3f} s = {ts['npu'][lab]:.0f} tok/s"
                                 f" (one term {ts['npu_one_term'][lab]:.0f})" for lab in labs)
                     + f"; CPU {w['cpu_s']:.3f} s = {ts['cpu']:.0f} tok/s (Q4_0-class efficiency {ts['cpu_q4_0']:.0f})")
        lines.append("")
    lines.append(f"crossover: prompt tokens from which the NPU beats the CPU ({t} terms; one term in brackets; "
                 "'-' = never)")
    for name, c in pred["crossover"].items():
        lines.append(f"  {name:<10}{str(c['K']) + 'x' + str(c['N']):>12}  " + "  ".join(
            f"{lab}: {c['tokens'][lab] or '-'} ({c['tokens_one_term'][lab] or '-'})" for lab in labs))
    a = pred["anchor_check"]
    lines.append(f"check: G's {'x'.join(map(str, a['shape']))} int8 at {a['clock_hz'] / 1e6:g} MHz took "
                 f"{a['published_s'] * 1e3:.1f} ms (published); the model says {a['model_s_1_core'] * 1e3:.1f} ms "
                 f"on 1 core, {a['model_s_3_core'] * 1e3:.1f} ms on 3")
    return "\n".join(lines)
