"""The paper cost model (rosenblatt.npu.cost): consistent with the plan, monotone, and a crossover
where the NPU and CPU curves cross. Nothing here is a measurement of the board."""

import pytest

from rosenblatt.npu import cost
from rosenblatt.npu import hw_assumptions as hw
from rosenblatt.npu import plan as P

QWEN = [(1536, 1536), (1536, 256), (1536, 8960), (8960, 1536)]  # Qwen2.5-1.5B K x N


@pytest.mark.parametrize("K,N", QWEN)
@pytest.mark.parametrize("M", [1, 7, 128, 512])
def test_npu_cost_follows_the_plan(M, K, N):
    plan = P.plan_gemm(M, K, N)
    c = cost.npu_gemm_cost(M, K, N)
    assert c.tasks == plan.task_count and c.jobs == plan.job_count and c.k_tiles == plan.ktiling.count
    assert c.macs == M * K * N
    assert c.padded_macs == sum(t.mt * t.nt * t.kt for t in plan.tasks) == plan.Mp * plan.Kp * plan.Np
    assert c.padded_macs >= c.macs
    # the tasks move at least every feature byte, every int32 output of every K tile and the weights once
    assert c.bytes_moved >= plan.feature_bytes + plan.output_bytes + P.weight_bytes(plan.ktiling, N)
    assert c.compute_s == pytest.approx(c.padded_macs / (hw.NPU_CLOCK_HZ * hw.MACS_PER_CYCLE))
    assert c.overhead_s == pytest.approx(c.tasks * hw.TASK_OVERHEAD_S + c.jobs * hw.JOB_OVERHEAD_S)
    # one core: the parts add up, and agree with the planner's own estimate (same model, whole tiles)
    assert c.seconds == pytest.approx(c.compute_s + c.dma_s + c.overhead_s + c.cpu_sum_s)
    assert c.seconds == pytest.approx(plan.estimated_seconds, rel=0.05)


@pytest.mark.parametrize("K,N", QWEN)
def test_npu_cost_is_monotone_in_m_clock_and_cores(K, N):
    ms = [1, 4, 16, 64, 128, 256, 512, 1024]
    npu = [cost.npu_gemm_cost(M, K, N).seconds for M in ms]
    cpu = [cost.cpu_gemm_cost(M, K, N).seconds for M in ms]
    assert npu == sorted(npu) and cpu == sorted(cpu)
    for M in (4, 128, 512):
        by_clock = [cost.npu_gemm_cost(M, K, N, hz).seconds for hz in (2e8, 4e8, 6e8, 1e9)]
        assert by_clock == sorted(by_clock, reverse=True) and by_clock[0] > by_clock[-1]
        assert cost.npu_gemm_cost(M, K, N, cores=3).seconds <= cost.npu_gemm_cost(M, K, N).seconds
    # the CPU: memory-bound for one row, compute-bound for a prompt
    assert cost.cpu_gemm_cost(1, K, N).bound == "memory" and cost.cpu_gemm_cost(512, K, N).bound == "compute"


def test_cpu_constants_match_the_anchors():
    peak = cost.CPU_CORES * cost.CPU_CLOCK_HZ * cost.CPU_SDOT_MACS_PER_CYCLE
    assert 2 * peak == pytest.approx(614.4e9)                     # docs/performance.md A.4
    assert 0.1 < cost.CPU_EFFICIENCY < 0.25 and cost.CPU_EFFICIENCY_Q4_0 > cost.CPU_EFFICIENCY
    # the efficiency reproduces the anchor it came from
    t = cost.ANCHOR_CPU_MACS_PER_TOKEN / (peak * cost.CPU_EFFICIENCY)
    assert 1 / t == pytest.approx(cost.ANCHOR_CPU_PP_TOK_S)


@pytest.mark.parametrize("K,N", QWEN)
@pytest.mark.parametrize("clock", [hw.NPU_CLOCK_HZ, cost.NPU_MAX_CLOCK_HZ])
@pytest.mark.parametrize("terms", [1, 2])
def test_the_crossover_is_where_the_curves_cross(K, N, clock, terms):
    m = cost.crossover(K, N, clock, npu_rows_per_row=terms)
    if m is None:
        assert terms == 2 and clock == hw.NPU_CLOCK_HZ      # two terms at 200 MHz: some shapes never win
        for M in (64, 512, 4096):
            assert cost.npu_gemm_cost(2 * M, K, N, clock).seconds >= cost.cpu_gemm_cost(M, K, N).seconds
        return
    assert m > 1                                             # one row always stays on the CPU
    assert cost.npu_gemm_cost(m * terms, K, N, clock).seconds < cost.cpu_gemm_cost(m, K, N).seconds
    assert cost.npu_gemm_cost((m - 1) * terms, K, N, clock).seconds >= cost.cpu_gemm_cost(m - 1, K, N).seconds
    # and the NPU keeps winning well above it
    for M in (2 * m, 4 * m):
        assert cost.npu_gemm_cost(M * terms, K, N, clock).seconds < cost.cpu_gemm_cost(M, K, N).seconds


def test_the_crossover_falls_with_the_clock_and_exists_for_one_term():
    for K, N in QWEN:
        slow, fast = cost.crossover(K, N), cost.crossover(K, N, cost.NPU_MAX_CLOCK_HZ)
        assert slow is not None and fast is not None and fast <= slow


def test_the_anchor_check_brackets_the_published_figure():
    a = cost.anchor_check()
    assert a["model_s_3_core"] <= a["model_s_1_core"]
    # within a factor of 2 of G's published time on either core count (a sanity check, not a fit)
    assert 0.5 < a["model_s_1_core"] / a["published_s"] < 2 and 0.5 < a["model_s_3_core"] / a["published_s"] < 2


def test_predict_prefill_adds_up():
    from rosenblatt.bench import QWEN25_1_5B, predict_prefill, prefill_matmuls
    pred = predict_prefill(prompt_tokens=(128,))
    p = pred["prompts"][0]
    assert list(p["per_matmul"]) == [name for name, _, _ in prefill_matmuls(QWEN25_1_5B)]
    lab = "200MHz"
    layer = sum(r["npu"][lab]["seconds"] for r in p["per_matmul"].values())
    assert p["layer"]["npu_s"][lab] == pytest.approx(layer)
    assert p["prompt"]["npu_s"][lab] == pytest.approx(28 * layer + pred["lm_head_cpu_s"])
    assert p["tok_s"]["npu"][lab] == pytest.approx(128 / p["prompt"]["npu_s"][lab])
    assert p["tok_s"]["npu"]["1000MHz"] > p["tok_s"]["npu"][lab]
    assert p["per_matmul"]["q_proj"]["npu"][lab]["M"] == 2 * 128      # two activation terms
