"""matmul_int8 through the simulator, bit-exact against numpy's int32 GEMM."""

import numpy as np
import pytest

from rosenblatt.npu import NPUPlanError, matmul_int8, matmul_int8_prepared, open_device, prepare_weights
from rosenblatt.npu import hw_assumptions as hw
from rosenblatt.npu import plan as P

MS = [1, 4, 7, 64, 128, 512]
KS = [32, 100, 1536, 8960]
NS = [32, 33, 256, 1536, 8960]
QWEN = [(1536, 1536), (1536, 256), (1536, 8960), (8960, 1536)]  # Qwen2.5-1.5B K x N
DEFAULT_MACS = 1.6e8  # int32 numpy reference cost bounds what the default suite affords
SLOW_MACS = 2.5e9


def _combos():
    default, slow, sampled = [], [], []
    for M in MS:
        for K in KS:
            for N in NS:
                macs = M * K * N
                if macs <= DEFAULT_MACS:
                    default.append((M, K, N))
                elif macs <= SLOW_MACS:
                    slow.append((M, K, N))
                elif (K, N) in QWEN:
                    sampled.append((M, K, N))  # row-sampled reference (below)
    return default, slow, sampled


DEFAULT, SLOW, SAMPLED = _combos()


@pytest.fixture(scope="module")
def dev():
    d = open_device(sim=True)
    yield d
    d.close()


def _operands(M, K, N, seed=0):
    rng = np.random.default_rng(seed + M * 1_000_003 + K * 1009 + N)
    return rng.integers(-128, 128, (M, K), dtype=np.int8), rng.integers(-128, 128, (K, N), dtype=np.int8)


def _reference(a, b):
    return a.astype(np.int32) @ b.astype(np.int32)


def _check(dev, M, K, N, report=None):
    a, b = _operands(M, K, N)
    c = matmul_int8(a, b, dev)
    assert c.dtype == np.int32 and c.shape == (M, N)
    np.testing.assert_array_equal(c, _reference(a, b))
    plan = P.plan_gemm(M, K, N)
    last = dev.stats.last
    assert (last.tasks, last.jobs, last.submits) == (plan.task_count, plan.job_count, 1)
    assert last.tasks >= last.jobs >= 1
    if report is not None:
        report.append((M, K, N, last.tasks, last.jobs))


@pytest.mark.parametrize("M,K,N", DEFAULT, ids=lambda v: str(v))
def test_matmul_bit_exact(dev, M, K, N):
    _check(dev, M, K, N)


@pytest.mark.slow
@pytest.mark.parametrize("M,K,N", SLOW, ids=lambda v: str(v))
@pytest.mark.slow
def test_matmul_bit_exact_large(dev, M, K, N):
    _check(dev, M, K, N)


@pytest.mark.slow
@pytest.mark.parametrize("M,K,N", SAMPLED, ids=lambda v: str(v))
@pytest.mark.slow
def test_matmul_bit_exact_largest_row_sampled(dev, M, K, N):
    """The largest Qwen shapes: the NPU result is complete, the int32 reference is computed for
    every M-tile boundary row and a random sample of the others (all columns)."""
    a, b = _operands(M, K, N)
    c = matmul_int8(a, b, dev)
    plan = P.plan_gemm(M, K, N)
    edges = {r for t in plan.tasks for r in (t.m0, t.m0 + 1, min(t.m0 + t.mt, M) - 1)}
    rows = sorted(r for r in edges | set(np.random.default_rng(5).integers(0, M, 16).tolist()) if r < M)
    np.testing.assert_array_equal(c[rows], _reference(a[rows], b))
    assert dev.stats.last.tasks == plan.task_count


def test_all_qwen_shapes_are_covered():
    covered = {(K, N) for _, K, N in DEFAULT + SLOW + SAMPLED}
    assert set(QWEN) <= covered
    for K, N in QWEN:
        assert (128, K, N) in SLOW + DEFAULT


def test_extreme_values_do_not_overflow(dev):
    K = 8960
    a = np.full((4, K), -128, np.int8)
    b = np.full((K, 64), -128, np.int8)
    c = matmul_int8(a, b, dev)
    assert (c == 128 * 128 * K).all()
    b[:, 1::2] = 127
    c = matmul_int8(a, b, dev)
    np.testing.assert_array_equal(c, _reference(a, b))


def test_prepared_weights_reused_with_different_a(dev):
    K, N = 1536, 256
    _, b = _operands(1, K, N)
    with prepare_weights(dev, b) as w:
        before = dev.stats.calls
        for M, seed in [(1, 1), (7, 2), (64, 3), (7, 4)]:
            a, _ = _operands(M, K, N, seed=seed)
            np.testing.assert_array_equal(matmul_int8_prepared(a, w, dev), _reference(a, b))
        assert dev.stats.calls == before + 4
        assert w.bo.iova == w.bo.iova  # one resident BO, same IOVA for every call
        assert w.ktiling.count == 1


def test_prepared_weights_on_another_device_are_refused(dev):
    other = open_device(sim=True)
    try:
        w = prepare_weights(other, np.ones((32, 32), np.int8))
        with pytest.raises(NPUPlanError, match="another device"):
            matmul_int8_prepared(np.ones((4, 32), np.int8), w, dev)
    finally:
        other.close()


@pytest.mark.parametrize(
    "a,b,match",
    [
        (np.ones((4, 32), np.int16), np.ones((32, 32), np.int8), "int8"),
        (np.ones((4, 32), np.int8), np.ones((32, 32), np.float32), "int8"),
        (np.ones((4, 32), np.int8), np.ones((33, 32), np.int8), "do not multiply"),
        (np.ones((0, 32), np.int8), np.ones((32, 32), np.int8), "non-empty"),
        (np.ones(32, np.int8), np.ones((32, 32), np.int8), "2-D"),
    ],
)
def test_bad_operands_are_refused(dev, a, b, match):
    with pytest.raises(NPUPlanError, match=match):
        matmul_int8(a, b, dev)


def _ceil(a, b):
    return -(-a // b)


def _floor_tasks(M, K, N, k_split=True):
    """The fewest tasks the CBUF rule allows, from the rule alone (not the planner): a task
    holds one 32-kernel weight group (32*kt bytes) in its weight banks -- the rest streams --,
    a multiple of 4 input rows of kt bytes in the remaining banks less DATA_BANK_MARGIN
    (by byte count: a lower bound of Mesa's entry estimate), <= MAX_ROWS_PER_TASK rows,
    <= 8192 kernels, <= 32 KiB per kernel. ``k_split`` also allows equal K tiles."""
    bank = hw.CBUF_BANK_BYTES
    Mp, Kp, Np = _ceil(M, 4) * 4, _ceil(K, 32) * 32, _ceil(N, 32) * 32
    best = None
    for n_k in range(1, Kp // 32 + 1 if k_split else 2):
        kt = _ceil(_ceil(Kp, n_k), 32) * 32
        if kt > bank:
            continue
        data_banks = hw.CBUF_BANKS - _ceil(32 * kt, bank) - hw.DATA_BANK_MARGIN
        rows = min(max(data_banks, 0) * bank // kt // 4 * 4, hw.MAX_ROWS_PER_TASK)
        if rows:
            tasks = _ceil(Kp, kt) * _ceil(Mp, rows) * _ceil(Np, 8192)
            best = tasks if best is None else min(best, tasks)
    return best


#: tasks per call after weight streaming (before: M=128 32/4/112/336, M=512 104/10/448/1248)
QWEN_TASKS = {128: (1, 1, 2, 6), 512: (3, 3, 6, 21)}


def test_qwen_task_and_job_counts(capsys):
    """Pins the tasks of the Qwen2.5-1.5B projections at M = 128 and 512 and checks each is at
    most twice the floor of the CBUF rule (computed above, independently of the planner)."""
    rows = []
    for M in (1, 128, 512):
        for i, (K, N) in enumerate(QWEN):
            p = P.plan_gemm(M, K, N)
            floor, floor_unsplit = _floor_tasks(M, K, N), _floor_tasks(M, K, N, k_split=False)
            rows.append((M, K, N, p.task_count, p.job_count, p.ktiling.count, floor, floor_unsplit))
            assert p.job_count <= p.task_count
            assert floor <= floor_unsplit
            if M in QWEN_TASKS:
                assert p.task_count == QWEN_TASKS[M][i], (M, K, N)
                assert p.task_count <= 2 * floor, (M, K, N, floor)
    with capsys.disabled():
        print("\nM K N tasks jobs k_tiles floor floor-without-K-split:", *rows, sep="\n  ")


def test_mtx512_recipe_shapes_plan():
    """mtx512 ran int8 544x544x4096 and 1x4096x4096 as one task each on hardware (weights
    streamed through 2 and 11 banks). We need <= 2 (512 rows per task at most; K = 4096 is cut
    in 2 K tiles to keep 64-row tasks)."""
    p = P.plan_gemm(544, 544, 4096)
    assert p.task_count <= 2 and p.ktiling.count == 1 and p.kernels_per_task == 4096
    assert not any(t.weights_resident for t in p.tasks)  # 2.2 MB of weights stream
    assert P.plan_gemm(1, 4096, 4096).task_count <= 2
    assert _floor_tasks(544, 544, 4096) == 2


@pytest.mark.slow
def test_mtx512_recipe_shape_bit_exact(dev):
    _check(dev, 544, 544, 4096)
    _check(dev, 1, 4096, 4096)


def test_streamed_and_resident_weights_bit_exact(dev):
    # 96 x 1536 x 2048: 3 MB of weights stream through the weight banks (one task);
    # 1024 x 64 x 64: 4 KiB stay resident, 2 M tiles, the second task reuses them.
    for M, K, N in ((96, 1536, 2048), (1024, 64, 64)):
        p = P.plan_gemm(M, K, N)
        _check(dev, M, K, N)
        if K == 64:
            assert p.task_count == 2 and p.tasks[1].weight_reuse
        else:
            assert p.task_count == 1 and not p.tasks[0].weights_resident


@pytest.mark.parametrize("M,K,N", [(3000, 64, 64), (5, 40000, 40), (2, 33, 9000)],
                         ids=["M-beyond-height-field", "K-beyond-one-bank", "N-beyond-cube-channel-field"])
def test_shapes_beyond_single_task_field_limits(dev, M, K, N):
    _check(dev, M, K, N)


def test_k_limit_is_refused(dev):
    with pytest.raises(NPUPlanError, match="outside 1..131071"):
        matmul_int8(np.zeros((1, 1 << 17), np.int8), np.zeros((1 << 17, 1), np.int8), dev)
