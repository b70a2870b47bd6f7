"""On an RK3588 with the rocket driver: the same checks as the simulator suite, on hardware.

Run with ``pytest -m board tests/board/test_npu_board.py`` (excluded by default)."""

import glob

import numpy as np
import pytest

pytestmark = pytest.mark.board


@pytest.fixture(scope="module")
def dev():
    from rosenblatt.npu import open_device

    if not glob.glob("/dev/accel/accel*"):  # selected with another -m on a machine without NPU
        pytest.skip("board test: no /dev/accel node here")
    d = open_device(sim=False)  # a node that is not a working rocket device fails the tests
    yield d
    d.close()


def test_driver_identity(dev):
    assert dev.version["name"] == "rocket"


def test_probe_self_test_on_hardware(dev):
    from rosenblatt.npu.probe import self_test

    report = self_test(dev)
    bad = [c for c in report["cases"] if c["result"] != "ok"]
    assert not bad, bad


@pytest.mark.parametrize("M", [1, 7, 128])
@pytest.mark.parametrize("K,N", [(1536, 1536), (1536, 256), (1536, 8960), (8960, 1536)])
def test_qwen_shapes_bit_exact_on_hardware(dev, M, K, N):
    from rosenblatt.npu import matmul_int8

    rng = np.random.default_rng(M + K + N)
    a = rng.integers(-128, 128, (M, K), dtype=np.int8)
    b = rng.integers(-128, 128, (K, N), dtype=np.int8)
    np.testing.assert_array_equal(matmul_int8(a, b, dev), a.astype(np.int32) @ b.astype(np.int32))


def test_selftest_variants_on_hardware(dev, tmp_path):
    """`probe --selftest` on the board: every disputed setting has a passing variant; the report
    is written (the choice is stored in the user's variant file, as the command does)."""
    import json
    import subprocess
    import sys

    path = tmp_path / "selftest.json"
    r = subprocess.run([sys.executable, "-m", "rosenblatt", "probe", "--selftest", "--json", "--report", str(path)],
                       capture_output=True, text=True, timeout=600)
    report = json.loads(path.read_text())
    table = [(v["name"], v["status"], v["details"].get("error", "")) for v in report["variants"]]
    assert report["mode"] == "hardware" and len(report["variants"]) > 0, r.stderr
    assert r.returncode == 0, (report["verdict"], table)
    assert not report["choice"]["unsettled"], table
