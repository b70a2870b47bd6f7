"""probe --selftest: the disputed-settings variants through the simulator, the report, the stored choice."""

import io
import json
import threading
import time

import pytest

from rosenblatt.npu import hw_assumptions as hw
from rosenblatt.npu import open_device, selftest
from rosenblatt.npu.probe import assumption_table
from rosenblatt.npu.simulator import SimulatedNPU


@pytest.fixture(scope="module")
def sim_report():
    before = assumption_table()
    report, code = selftest.run_selftest(sim=True)
    assert assumption_table() == before  # every variant's settings were restored
    return report, code


def test_every_variant_passes_or_is_refused_as_expected(sim_report):
    report, code = sim_report
    assert code == selftest.EXIT_OK, report["verdict"]
    assert [r["name"] for r in report["variants"]] == [v.name for v in selftest.VARIANTS]
    for r, v in zip(report["variants"], selftest.VARIANTS):
        if v.sim_expect == "pass":
            assert r["status"] == "pass", r
        else:
            assert r["status"] == "refused" and r["details"]["fault"] == v.sim_expect.split(":", 1)[1], r
        assert r["matches_sim_expect"]
        assert r["settings"] == {**hw.DEFAULTS, **v.settings}
        assert r["details"]["seconds"] < 5


def test_the_variants_cover_every_disputed_setting_and_differ_where_they_should(sim_report):
    report, _ = sim_report
    by = {r["name"]: r for r in report["variants"]}
    assert {r["group"] for r in report["variants"]} == {"op_enable", "data_banks", "rows", "qd_en", "weights",
                                                        "weight_reuse"}
    assert by["op-enable-0x0D"]["details"]["regcmd_words"] == 108  # mtx512's program length
    assert by["op-enable-0x1D"]["details"]["regcmd_words"] == 126
    assert by["data-banks-exact"]["details"]["banks"] == [[10, 2]]  # the input fills its banks exactly
    assert by["data-banks+1"]["details"]["banks"] == [[11, 1]]
    assert by["weights-streamed-one-task"]["details"]["tasks"] == 1
    assert by["weights-split-resident"]["details"]["tasks"] > 1
    # what probe --explore switched (now folded in): WEIGHT_REUSE on the later row tiles, or none
    assert by["weight-reuse-on"]["details"]["weight_reuse_tasks"] == 2
    assert by["weight-reuse-off"]["details"]["weight_reuse_tasks"] == 0
    assert {r["status"] for r in report["variants"]} == {"pass", "refused"}
    assert sum(r["status"] == "refused" for r in report["variants"]) == 3


def test_choice_takes_the_default_first_and_falls_back(sim_report):
    report, _ = sim_report
    ch = report["choice"]
    assert ch["unsettled"] == []
    assert {k: ch["settings"][k] for k in hw.DEFAULTS} == hw.DEFAULTS
    # the board refutes 0x1D and the spare bank: the alternatives are chosen
    rs = [dict(r) for r in report["variants"]]
    for r in rs:
        if r["name"] in ("op-enable-0x1D", "data-banks+1"):
            r["status"] = "timeout"
    ch = selftest.choose(rs)
    assert ch["chosen"]["op_enable"] == "op-enable-0x0D" and ch["chosen"]["data_banks"] == "data-banks-exact"
    assert ch["settings"]["OP_ENABLE_MASK"] == 0x0D and ch["settings"]["PROGRAM_DPU_RDMA"] is False
    assert ch["settings"]["DATA_BANK_MARGIN"] == 0
    # nothing in a group passes: unsettled, defaults stay
    for r in rs:
        if r["group"] == "qd_en":
            r["status"] = "mismatch"
    assert "qd_en" in selftest.choose(rs)["unsettled"]


def test_json_report_written_with_one_entry_per_variant(tmp_path):
    out = io.StringIO()
    path = tmp_path / "r" / "selftest.json"
    code = selftest.main_selftest(sim=True, json=True, report_path=str(path), out=out)
    assert code == 0
    printed = json.loads(out.getvalue())
    on_disk = json.loads(path.read_text())
    assert printed["report_path"] == str(path) and on_disk["variants"] == printed["variants"]
    assert len(on_disk["variants"]) == len(selftest.VARIANTS)
    for r in on_disk["variants"]:
        assert {"name", "settings", "status", "details"} <= set(r)
        assert r["status"] in ("pass", "mismatch", "timeout", "refused", "error")
    assert on_disk["stored"] is None  # a simulator run stores no board choice


def test_table_and_default_report_path(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    out = io.StringIO()
    assert selftest.main_selftest(sim=True, out=out) == 0
    text = out.getvalue()
    path = tmp_path / "rosenblatt" / "npu-selftest-sim.json"
    assert path.is_file() and f"report: {path}" in text
    for v in selftest.VARIANTS:
        assert v.name in text
    assert "refused as expected" in text


def _bounded(fn, seconds):
    """Run fn() in a thread; fail (without pytest plugins) if it has not returned in ``seconds``."""
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", fn()), daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"the self-test hung for more than {seconds} s"
    return box["r"], time.monotonic() - t0


def test_a_variant_that_never_completes_is_reported_as_timeout_without_hanging():
    # a simulator whose jobs take 10^6 times the modelled time: the fence never signals in time
    def slow():
        return open_device(sim=True, npu=SimulatedNPU(timing=1e6))

    (report, code), elapsed = _bounded(
        lambda: selftest.run_selftest(sim=True, variants=selftest.VARIANTS[:2], open_dev=slow, timeout_s=0.3), 10)
    assert code == selftest.EXIT_FAILED
    assert [r["status"] for r in report["variants"]] == ["timeout", "timeout"]
    assert all(not r["matches_sim_expect"] for r in report["variants"])
    assert elapsed < 5


def test_fence_without_output_is_a_timeout(monkeypatch):
    # the kernel may signal a timed-out job's fence (open question 6): the sentinel shows it
    from rosenblatt.npu import gemm

    monkeypatch.setattr(gemm.GemmRun, "submit", lambda self, validate=True: None)
    r = selftest.run_variant(selftest.VARIANTS[0], lambda: open_device(sim=True), timeout_s=0.5)
    assert r["status"] == "timeout" and "never wrote its output" in r["details"]["error"]


def test_mismatch_and_error_statuses(monkeypatch):
    from rosenblatt.npu import gemm

    real = gemm.GemmRun.result
    monkeypatch.setattr(gemm.GemmRun, "result", lambda self: real(self) + (self.M > 0))
    r = selftest.run_variant(selftest.VARIANTS[0], lambda: open_device(sim=True))
    assert r["status"] == "mismatch" and r["details"]["first_difference"]["row"] == 0
    monkeypatch.undo()

    def boom(*a, **k):
        raise ValueError("field overflow")

    monkeypatch.setattr(selftest, "PATCHES", {"data_banks_by_bytes": boom})
    v = next(v for v in selftest.VARIANTS if v.patch)
    r = selftest.run_variant(v, lambda: open_device(sim=True))
    assert r["status"] == "error" and "field overflow" in r["details"]["error"]


def test_store_and_load_the_board_choice(tmp_path, monkeypatch):
    path = tmp_path / "npu-variant.json"
    monkeypatch.setenv(hw.VARIANT_ENV, str(path))
    choice = {"settings": {"PROGRAM_DPU_RDMA": False, "OP_ENABLE_MASK": 0x0D, "CORE_QD_EN": 0},
              "chosen": {"op_enable": "op-enable-0x0D"}, "unsettled": []}
    selftest.store_choice(choice, "radxa,rock-5b", str(path))
    selftest.store_choice({"settings": {}, "chosen": {}, "unsettled": ["rows"]}, "other,board", str(path))
    data = json.loads(path.read_text())
    assert set(data["boards"]) == {"radxa,rock-5b", "other,board"}
    settings, source = hw.load_board_variant("radxa,rock-5b")
    assert settings == choice["settings"] and "radxa,rock-5b" in source
    assert hw.load_board_variant("unknown,board") is None
    # inline JSON and "off" in the environment
    monkeypatch.setenv(hw.VARIANT_ENV, '{"DATA_BANK_MARGIN": 0}')
    assert hw.load_board_variant("radxa,rock-5b") == ({"DATA_BANK_MARGIN": 0}, "$" + hw.VARIANT_ENV)
    monkeypatch.setenv(hw.VARIANT_ENV, "off")
    assert hw.load_board_variant("radxa,rock-5b") is None and hw.variant_file() is None
    # a bad entry is ignored, never raised
    monkeypatch.setenv(hw.VARIANT_ENV, '{"OP_ENABLE_MASK": 7}')
    assert hw.load_board_variant() is None
    monkeypatch.setenv(hw.VARIANT_ENV, '{"NOT_A_SETTING": 1}')
    assert hw.load_board_variant() is None


def test_hardware_run_stores_the_choice_for_the_board(tmp_path, monkeypatch):
    # the store path of a hardware run, driven through the simulator
    path = tmp_path / "v.json"
    monkeypatch.setenv(hw.VARIANT_ENV, str(path))
    report, code = selftest.run_selftest(sim=True, variants=selftest.VARIANTS[:2], store=True, board="test,board")
    assert code == 0 and report["stored"] == {"path": str(path), "board": "test,board"}
    entry = json.loads(path.read_text())["boards"]["test,board"]
    assert entry["chosen"] == {"op_enable": "op-enable-0x1D"}
    assert entry["settings"] == {"PROGRAM_DPU_RDMA": True, "OP_ENABLE_MASK": 0x1D}


def test_apply_settings_roundtrip():
    saved = {k: getattr(hw, k) for k in hw.DISPUTED_SETTINGS}
    try:
        hw.apply_settings({"CORE_QD_EN": 0, "STREAM_WEIGHTS": False})
        assert hw.CORE_QD_EN == 0 and hw.STREAM_WEIGHTS is False
        with pytest.raises(ValueError):
            hw.apply_settings({"ROW_ALIGN": 3})
    finally:
        for k, v in saved.items():
            setattr(hw, k, v)
