"""Several products in one SUBMIT (``matmul_int8_batch``) and dependency graphs in the fewest
SUBMITs (``submit_levels``, ``run_gemm_graph``), bit-exact in the simulator, with the job order
the driver defines (hw_assumptions.JOBS_RUN_IN_SUBMIT_ORDER) checked."""

import numpy as np
import pytest

from rosenblatt.npu import (GemmNode, NPUPlanError, matmul_int8_batch, open_device, prepare_weights,
                            run_gemm_graph, submit_levels)
from rosenblatt.npu import hw_assumptions as hw
from rosenblatt.npu.gemm import GemmBatch


@pytest.fixture
def dev():
    d = open_device(sim=True)
    yield d
    d.close()


def _ref(a, b):
    return a.astype(np.int32) @ b.astype(np.int32)


def test_batch_is_one_submit_and_bit_exact(dev):
    rng = np.random.default_rng(0)
    shapes = [(7, 64, 96), (64, 100, 33), (16, 8960, 256), (1, 1536, 256)]     # K split in the third
    bs = [rng.integers(-128, 128, (K, N), dtype=np.int8) for _, K, N in shapes]
    as_ = [rng.integers(-128, 128, (M, K), dtype=np.int8) for M, K, _ in shapes]
    ws = [prepare_weights(dev, b) for b in bs]
    out = matmul_int8_batch(list(zip(as_, ws)), dev)
    for c, a, b in zip(out, as_, bs):
        np.testing.assert_array_equal(c, _ref(a, b))
    last = dev.stats.last
    assert dev.stats.submits == 1 and last.gemms == 4 and dev.stats.calls == 4
    assert last.jobs >= 4 and last.tasks >= last.jobs


def test_batch_regions_are_disjoint_and_jobs_in_item_order(dev):
    rng = np.random.default_rng(1)
    items = [(rng.integers(-128, 128, (M, 64), dtype=np.int8),
              prepare_weights(dev, rng.integers(-128, 128, (64, 32), dtype=np.int8))) for M in (4, 12, 8)]
    batch = GemmBatch(dev, items)
    jobs = batch.jobs()
    assert len(jobs) == batch.job_count == 3
    # job i holds item i's tasks, in item order (the driver runs them in submit order)
    assert [j.tasks[0][0] for j in jobs] == sorted(j.tasks[0][0] for j in jobs)
    for lo, hi in zip(batch.output_offsets, batch.output_offsets[1:]):
        assert hi - lo >= batch.plans[0].output_bytes and hi % 4096 == 0
    assert all(j.out_bos == [batch.output] for j in jobs)


def test_levels_are_the_longest_dependency_chain():
    assert submit_levels([(), (), (0,), (1, 2), ()]) == [[0, 1, 4], [2], [3]]
    assert submit_levels([]) == []
    with pytest.raises(NPUPlanError, match="earlier nodes"):
        submit_levels([(1,), ()])


def test_graph_runs_each_level_as_one_submit_in_order(dev):
    """A chain with CPU work between the products and independent products beside it: one SUBMIT
    per level, inputs built only after the dependencies' done callbacks, results bit-exact."""
    rng = np.random.default_rng(2)
    b1, b2 = (rng.integers(-128, 128, (64, 64), dtype=np.int8) for _ in range(2))
    w1, w2 = prepare_weights(dev, b1), prepare_weights(dev, b2)
    a0 = [rng.integers(-128, 128, (8, 64), dtype=np.int8) for _ in range(3)]
    seen, log = {}, []

    def done(i):
        def f(c):
            seen[i] = c
            log.append(("done", i))
        return f

    def requant(i):
        def f():
            log.append(("input", i))
            return np.clip(seen[i] >> 12, -127, 127).astype(np.int8)
        return f

    nodes = [GemmNode(w1, a0[0], (), done(0)), GemmNode(w2, a0[1], (), done(1)),
             GemmNode(w2, requant(0), (0,), done(2)), GemmNode(w1, requant(2), (2,), done(3)),
             GemmNode(w1, a0[2], (), done(4))]
    res = run_gemm_graph(nodes, dev)
    assert dev.stats.submits == 3 and dev.stats.calls == 5
    assert log.index(("done", 0)) < log.index(("input", 0)) < log.index(("done", 2)) < log.index(("input", 2))
    np.testing.assert_array_equal(res[0], _ref(a0[0], b1))
    np.testing.assert_array_equal(res[1], _ref(a0[1], b2))
    np.testing.assert_array_equal(res[4], _ref(a0[2], b1))
    x2 = np.clip(res[0] >> 12, -127, 127).astype(np.int8)
    np.testing.assert_array_equal(res[2], _ref(x2, b2))
    np.testing.assert_array_equal(res[3], _ref(np.clip(res[2] >> 12, -127, 127).astype(np.int8), b1))
    assert not dev.transport.take_faults()


def test_the_ordering_facts_are_recorded():
    assert hw.JOBS_RUN_IN_SUBMIT_ORDER is True and hw.BATCH_ONE_OUTPUT_WAIT is True
    assert "write" in hw.IN_BO_FENCES
