"""npu-probe: self-test through the simulator, exit codes, and the no-device message."""

import glob
import io
import json
import os
import subprocess
import sys

import pytest

from rosenblatt.npu import probe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "npu-probe")
NO_ACCEL = not glob.glob("/dev/accel/accel*")


def _run(**kw):
    out = io.StringIO()
    code = probe.run_probe(out=out, **kw)
    return code, out.getvalue()


def test_probe_sim_json_passes_its_self_test():
    code, text = _run(sim=True, json=True)
    report = json.loads(text)
    assert code == 0 and report["exit_code"] == 0
    assert report["mode"] == "simulator"
    assert report["device"]["version"]["name"] == "rocket"
    cases = report["self_test"]["cases"]
    assert len(cases) == len(probe.SELF_TEST_SHAPES)
    assert all(c["result"] == "ok" and c["tasks"] >= 1 for c in cases)
    assert report["benchmark"]["gops"] > 0
    assert report["assumptions"]["CBUF_BANKS"] == 12


def test_probe_sim_text_report():
    code, text = _run(sim=True, json=False, bench=False)
    assert code == 0
    assert "self-test:" in text and "all good" in text


def test_probe_script_sim_json():
    r = subprocess.run([sys.executable, SCRIPT, "--sim", "--json", "--no-bench"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["self_test"]["status"] == "ok"


@pytest.mark.skipif(not NO_ACCEL, reason="this machine has an accel node")
def test_probe_without_device_exits_2_with_a_clear_message():
    code, text = _run(sim=False, json=False)
    assert code == 2
    assert "no RK3588 NPU here" in text and "--sim" in text
    code, text = _run(sim=False, json=True)
    assert code == 2 and json.loads(text)["exit_code"] == 2


@pytest.mark.skipif(not NO_ACCEL, reason="this machine has an accel node")
def test_probe_script_without_device():
    r = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "no RK3588 NPU here" in r.stdout


def test_probe_reports_a_mismatch_with_the_first_differing_element(monkeypatch):
    from rosenblatt.npu import gemm

    real = gemm.layout.unpack_output

    def corrupt(words, rows, channels):
        c = real(words, rows, channels).copy()
        c[0, 1] += 1
        return c

    monkeypatch.setattr(gemm.layout, "unpack_output", corrupt)
    code, text = _run(sim=True, json=False, bench=False)
    assert code == 1
    assert "MISMATCH" in text and "first C[0,1]" in text


def test_probe_reports_a_hung_job_as_device_error(monkeypatch):
    from rosenblatt.npu import regcmd

    monkeypatch.setattr(regcmd, "tail_words", lambda op_mask=None: [0, 0, 0, 0])  # no op-enable
    code, text = _run(sim=True, json=True, bench=False)
    report = json.loads(text)
    assert code == 3
    assert report["self_test"]["cases"][0]["result"] == "timeout"
    assert "no-op-enable" in report["self_test"]["cases"][0]["error"]


def test_explore_is_a_deprecated_alias_of_selftest(tmp_path, capsys):
    code = probe.main(["--explore", "--sim", "--json", "--report", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert "deprecated" in err and "--selftest" in err
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and report["mode"] == "simulator"
    # what --explore switched is in the self-test's variants
    switched = {k for v in report["variants"] for k in v["switched"]}
    assert {"DATA_BANK_MARGIN", "WEIGHT_REUSE_WITHIN_JOB", "PROGRAM_DPU_RDMA", "CORE_QD_EN"} <= switched


def _cli_env(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), ROSENBLATT_NPU_VARIANT="off")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_cli_probe_selftest_sim_json_writes_the_report(tmp_path):
    path = tmp_path / "out" / "selftest.json"
    r = subprocess.run([sys.executable, "-m", "rosenblatt", "probe", "--selftest", "--sim", "--json",
                        "--report", str(path)], capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                       env=_cli_env(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    printed = json.loads(r.stdout)
    report = json.loads(path.read_text())
    assert printed["report_path"] == str(path) and report["exit_code"] == 0
    from rosenblatt.npu.selftest import VARIANTS

    assert [v["name"] for v in report["variants"]] == [v.name for v in VARIANTS]
    assert {v["status"] for v in report["variants"]} <= {"pass", "refused"}
    assert all(v["matches_sim_expect"] for v in report["variants"])


def test_cli_probe_selftest_sim_table_default_report(tmp_path):
    r = subprocess.run([sys.executable, "-m", "rosenblatt", "probe", "--selftest", "--sim"], capture_output=True,
                       text=True, timeout=300, cwd=str(tmp_path), env=_cli_env(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    path = tmp_path / "cache" / "rosenblatt" / "npu-selftest-sim.json"
    assert path.is_file() and f"report: {path}" in r.stdout
    assert "op-enable-0x0D" in r.stdout and "verdict" in r.stdout


def test_probe_script_selftest(tmp_path):
    path = tmp_path / "s.json"
    r = subprocess.run([sys.executable, SCRIPT, "--selftest", "--sim", "--report", str(path)], capture_output=True,
                       text=True, timeout=300, env=_cli_env(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(json.loads(path.read_text())["variants"]) > 0


@pytest.mark.skipif(not NO_ACCEL, reason="this machine has an accel node")
def test_cli_probe_selftest_without_device_exits_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "rosenblatt", "probe", "--selftest", "--report",
                        str(tmp_path / "r.json")], capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
                       env=_cli_env(tmp_path))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no RK3588 NPU here" in r.stdout
