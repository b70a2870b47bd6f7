"""fleet/<board>.yaml → rosenblatt.fleet.Board: the repository's file, the schema checks, and what
``probe`` and ``bench --board`` do with a board."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from rosenblatt.bench import format_board_table
from rosenblatt.cli import main
from rosenblatt.errors import RosenblattError
from rosenblatt.fleet import (
    BOARD_ENV,
    EXIT_BOARD_MISMATCH,
    FLEET_DIR_ENV,
    FleetError,
    check_probe,
    compare_bench,
    cpu_list,
    default_board,
    fleet_dir,
    load_board,
    probe_exit_code,
)

REPO = Path(__file__).resolve().parents[2]
BOLTZMANN = REPO / "fleet" / "boltzmann.yaml"


@pytest.fixture
def raw() -> dict:
    """The repository's board file as plain data, to mutate."""
    return yaml.safe_load(BOLTZMANN.read_text())


def write(tmp_path: Path, data, name: str = "boltzmann") -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return p


# ---------------------------------------------------------------- the repository's file


def test_repository_board_file_validates():
    b = load_board(BOLTZMANN)
    assert b.name == "boltzmann"
    assert b.soc.name == "RK3588" and b.memory.ram_gib == 32
    assert b.cpu.a76 == (4, 5, 6, 7) and b.cpu.a55 == (0, 1, 2, 3)
    assert b.npu.driver == "rocket" and b.npu.cores == 3 and b.npu.device == "/dev/accel/accel0"
    assert b.npu.clock_mhz == 200
    assert (b.probe.expect.exit_code, b.probe.expect.driver, b.probe.expect.cores) == (0, "rocket", 3)
    assert b.probe.command == ("python", "-m", "rosenblatt", "probe")
    assert b.kernel.module == "rocket" and b.kernel.min_version == "6.18"
    rkllm = b.anchor("rkllm-w8a8")
    assert (rkllm.decode_tok_s, rkllm.prefill_tok_s, rkllm.kind) == (16.69, 338, "measured")
    assert b.bench.targets["floor"].decode_tok_s < b.bench.targets["stretch"].decode_tok_s


def test_repository_board_references_existing_repo_files():
    b = load_board(BOLTZMANN)
    assert b.root == REPO
    for rel in (b.kernel.config_fragment, b.kernel.overlay):
        assert b.repo_path(rel).is_file(), rel


def test_bench_command_is_pinned_to_the_a76_cores():
    b = load_board(BOLTZMANN)
    argv = b.bench_argv("/m/q.gguf")
    assert argv == ["taskset", "-c", "4-7", "python", "-m", "rosenblatt", "bench",
                    "--model", "/m/q.gguf", "--threads", "4"]
    assert b.bench_argv()[8] == str(b.model_path(b.bench.model))
    assert b.model_path().name == "qwen2.5-1.5b-instruct-q4_k_m.gguf"


def test_unknown_model_key_is_a_fleet_error():
    b = load_board(BOLTZMANN)
    with pytest.raises(FleetError, match=r"models\.files: no model named 'nope'"):
        b.model_path("nope")


def test_load_by_name_equals_load_by_path():
    assert fleet_dir() == REPO / "fleet"
    assert load_board("boltzmann") == load_board(BOLTZMANN) == load_board(str(BOLTZMANN))


def test_models_dir_expands_home_and_variables(tmp_path, raw, monkeypatch):
    monkeypatch.setenv("RB_MODELS", "/srv/llm")
    raw["models"]["dir"] = "$RB_MODELS/gguf"
    b = load_board(write(tmp_path, raw))
    assert b.model_path("qwen2.5-0.5b-instruct-q4_k_m") == Path("/srv/llm/gguf/qwen2.5-0.5b-instruct-q4_k_m.gguf")


def test_cpu_list():
    assert cpu_list([4, 5, 6, 7]) == "4-7"
    assert cpu_list([7, 0, 2, 3]) == "0,2-3,7"
    assert cpu_list([5]) == "5"


# ---------------------------------------------------------------- default_board


def test_default_board_is_boltzmann(monkeypatch):
    monkeypatch.delenv(FLEET_DIR_ENV, raising=False)
    monkeypatch.delenv(BOARD_ENV, raising=False)
    b = default_board()
    assert b is not None and b.path == BOLTZMANN


def test_default_board_absent_returns_none(tmp_path, monkeypatch):
    monkeypatch.setenv(FLEET_DIR_ENV, str(tmp_path / "no-fleet-here"))
    monkeypatch.delenv(BOARD_ENV, raising=False)
    assert default_board() is None


def test_default_board_present_but_invalid_raises(tmp_path, raw, monkeypatch):
    raw["npu"]["cores"] = 0
    write(tmp_path, raw)
    monkeypatch.setenv(FLEET_DIR_ENV, str(tmp_path))
    with pytest.raises(FleetError, match=r"npu\.cores"):
        default_board()


def test_board_env_selects_another_board(tmp_path, raw, monkeypatch):
    raw["name"] = "fermi"
    write(tmp_path, raw, name="fermi")
    monkeypatch.setenv(FLEET_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(BOARD_ENV, "fermi")
    assert default_board().name == "fermi"


# ---------------------------------------------------------------- schema violations


def _set(d: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        d = d[int(p)] if isinstance(d, list) else d[p]
    if isinstance(d, list):
        d[int(last)] = value
    else:
        d[last] = value


def _del(d: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        d = d[int(p)] if isinstance(d, list) else d[p]
    del d[last]


VIOLATIONS = [
    # (id, mutation, expected key, expected fragment of the problem)
    ("missing-top-level", lambda d: _del(d, "npu"), "npu", "missing required key"),
    ("missing-nested", lambda d: _del(d, "npu.clock_mhz"), "npu.clock_mhz", "missing required key in npu"),
    ("missing-deep", lambda d: _del(d, "probe.expect.driver"), "probe.expect.driver", "missing required key"),
    ("unknown-top-level", lambda d: d.update(gpu={"cores": 1}), "gpu", "unknown key in top level"),
    ("unknown-nested-typo", lambda d: _set(d, "npu.clok_mhz", 200), "npu.clok_mhz", "unknown key in npu"),
    ("type-str-for-int", lambda d: _set(d, "npu.cores", "three"), "npu.cores", "expected an integer"),
    ("type-bool-for-int", lambda d: _set(d, "probe.expect.exit_code", True), "probe.expect.exit_code", "expected an integer"),
    ("type-float-version", lambda d: _set(d, "kernel.min_version", 6.18), "kernel.min_version", "quote it"),
    ("type-list-for-map", lambda d: _set(d, "cpu", [4, 5]), "cpu", "expected a mapping"),
    ("type-scalar-for-list", lambda d: _set(d, "cpu.a76", 4), "cpu.a76", "expected a list"),
    ("type-list-item", lambda d: _set(d, "cpu.a76", [4, "5"]), "cpu.a76[1]", "expected an integer"),
    ("type-str-for-number", lambda d: _set(d, "npu.clock_mhz", "200MHz"), "npu.clock_mhz", "expected a number"),
    ("range-clock-zero", lambda d: _set(d, "npu.clock_mhz", 0), "npu.clock_mhz", "must be > 0"),
    ("range-clock-negative", lambda d: _set(d, "npu.clock_mhz", -5), "npu.clock_mhz", "must be > 0"),
    ("range-a76-empty", lambda d: _set(d, "cpu.a76", []), "cpu.a76", "must not be empty"),
    ("range-a76-negative", lambda d: _set(d, "cpu.a76", [4, -1]), "cpu.a76[1]", "must be >= 0"),
    ("range-a76-duplicate", lambda d: _set(d, "cpu.a76", [4, 4, 5]), "cpu.a76", "unique"),
    ("range-npu-cores", lambda d: _set(d, "npu.cores", 0), "npu.cores", "must be >= 1"),
    ("range-exit-code", lambda d: _set(d, "probe.expect.exit_code", 256), "probe.expect.exit_code", "must be <= 255"),
    ("range-anchor", lambda d: _set(d, "bench.anchors.0.decode_tok_s", -1), "bench.anchors[0].decode_tok_s", "must be > 0"),
    ("range-ram", lambda d: _set(d, "memory.ram_gib", 0), "memory.ram_gib", "must be > 0"),
    ("choice-anchor-kind", lambda d: _set(d, "bench.anchors.1.kind", "guess"), "bench.anchors[1].kind", "must be one of"),
    ("pattern-device", lambda d: _set(d, "npu.device", "accel0"), "npu.device", "does not match"),
    ("pattern-model-file", lambda d: d["models"]["files"].update({"qwen2.5-1.5b-instruct-q8_0": "q8.bin"}),
     "models.files.qwen2.5-1.5b-instruct-q8_0", "does not match"),
    ("empty-string", lambda d: _set(d, "board.model", "  "), "board.model", "must not be empty"),
    ("schema-version", lambda d: _set(d, "schema", 2), "schema", "must be <= 1"),
    # cross-field rules
    ("cross-bench-on-a55", lambda d: _set(d, "bench.cpus", [0, 1, 2, 3]), "bench.cpus", "not an A76 core"),
    ("cross-threads", lambda d: _set(d, "bench.threads", 8), "bench.threads", "8 threads on 4 pinned CPUs"),
    ("cross-probe-cores", lambda d: _set(d, "probe.expect.cores", 2), "probe.expect.cores", "npu.cores is 3"),
    ("cross-probe-driver", lambda d: _set(d, "probe.expect.driver", "rknpu"), "probe.expect.driver", "npu.driver"),
    ("cross-npu-vs-soc", lambda d: _set(d, "npu.cores", 4), "npu.cores", "exceeds soc.npu_cores"),
    ("cross-a55-overlap", lambda d: _set(d, "cpu.a55", [0, 1, 2, 4]), "cpu.a55", "both A76 and A55"),
    ("cross-bench-model", lambda d: _set(d, "bench.model", "llama-70b"), "bench.model", "not a key of models.files"),
    ("cross-default-model", lambda d: _set(d, "models.default", "llama-70b"), "models.default", "not a key"),
    ("cross-no-model-placeholder", lambda d: _set(d, "bench.command", ["python", "-m", "rosenblatt", "bench"]),
     "bench.command", "{model}"),
    ("cross-unknown-placeholder", lambda d: _set(d, "bench.command.3", "{gpu}"), "bench.command[3]", "unknown placeholder {gpu}"),
    ("cross-name-vs-file", lambda d: _set(d, "name", "einstein"), "name", "must match the file name"),
    ("cross-duplicate-anchor", lambda d: _set(d, "bench.anchors.1.name", "rkllm-w8a8"), "bench.anchors[1].name", "duplicate"),
]


@pytest.mark.parametrize("mutate,key,fragment", [v[1:] for v in VIOLATIONS], ids=[v[0] for v in VIOLATIONS])
def test_schema_violation_names_file_and_key(tmp_path, raw, mutate, key, fragment):
    data = copy.deepcopy(raw)
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(FleetError) as info:
        load_board(path)
    err = info.value
    assert err.key == key
    assert fragment in err.problem
    msg = str(err)
    assert msg.startswith(f"{path}: {key}: ")
    assert "\n" not in msg
    assert isinstance(err, RosenblattError) and isinstance(err, ValueError)


def test_the_unmodified_copy_is_valid(tmp_path, raw):
    """Guards the parametrized test above: the failures come from the mutations alone."""
    assert load_board(write(tmp_path, raw)).name == "boltzmann"


@pytest.mark.parametrize("text,fragment", [
    ("npu: [unclosed\n", "not valid YAML at line"),
    ("", "file is empty"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("just a string\n", "expected a mapping"),
])
def test_unusable_files(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(FleetError) as info:
        load_board(path)
    assert str(info.value).startswith(str(path))
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_and_bad_name(tmp_path):
    with pytest.raises(FleetError, match="no such board file"):
        load_board(tmp_path / "absent.yaml")
    with pytest.raises(FleetError, match="bad board name"):
        load_board("Bad Name!")
    with pytest.raises(FleetError, match=r"no such board file \(boards here: boltzmann\)"):
        load_board("absent")


def test_strings_are_not_numbers_and_null_is_not_a_section(tmp_path, raw):
    """Strict scalars: YAML "4" (a string) is refused where an integer is wanted, as is 4.0."""
    for dotted, value, fragment in (("bench.threads", "4", "expected an integer, got string '4'"),
                                    ("bench.threads", 4.0, "expected an integer, got number 4.0"),
                                    ("npu", None, "expected a mapping, got null")):
        data = copy.deepcopy(raw)
        _set(data, dotted, value)
        with pytest.raises(FleetError) as info:
            load_board(write(tmp_path, data))
        assert (info.value.key, info.value.problem) == (dotted, fragment)


def test_unknown_key_lists_the_allowed_ones(tmp_path, raw):
    raw["bench"]["anchors"][0]["decode"] = 1
    with pytest.raises(FleetError) as info:
        load_board(write(tmp_path, raw))
    assert info.value.key == "bench.anchors[0].decode"
    assert info.value.problem == ("unknown key in bench.anchors[0] (allowed: name, source, kind, decode_tok_s, "
                                  "prefill_tok_s)")


def test_boards_are_frozen():
    b = load_board(BOLTZMANN)
    with pytest.raises(ValueError, match="frozen"):
        b.npu.cores = 2


# ---------------------------------------------------------------- probe against the board


def _report(mode="hardware", driver="rocket", opened=True, nodes=1, dt=("okay",) * 3, exit_code=0) -> dict:
    """The parts of a probe report (``rosenblatt.npu.probe``'s JSON) the board check reads."""
    version = {"name": driver, "desc": "fake", "major": 1, "minor": 0}
    accel = [{"path": f"/dev/accel/accel{i}", "sysfs_driver": driver,
              **({"version": version} if opened else {"error": "not rocket"})} for i in range(nodes)]
    return {
        "mode": mode,
        "accel_nodes": accel,
        "device_tree": [{"node": f"/npu@fdab{i}000", "status": s} for i, s in enumerate(dt)],
        "device": {"node": "/dev/accel/accel0", "version": version} if opened and nodes else {"error": "no device"},
        "exit_code": exit_code,
    }


def test_check_probe_on_a_matching_board():
    b = load_board(BOLTZMANN)
    report = _report()
    assert check_probe(b, report) == [
        "board boltzmann expects driver rocket: found rocket",
        "board boltzmann expects 3 NPU cores: found 3",
        "board boltzmann expects exit status 0: found 0",
    ]
    assert probe_exit_code(b, report, 0) == 0


def test_check_probe_wrong_driver_fails_the_probe_where_the_device_exists():
    b = load_board(BOLTZMANN)
    report = _report(driver="rknpu", opened=False, exit_code=2)
    lines = check_probe(b, report)
    assert lines[0] == "board boltzmann expects driver rocket: found rknpu  [not met]"
    assert lines[2] == "board boltzmann expects exit status 0: found 2  [not met]"
    assert probe_exit_code(b, report, 2) == 2                  # the probe's own failure stays
    working = _report(driver="rknpu")                            # a device that opened and passed
    assert probe_exit_code(b, working, 0) == EXIT_BOARD_MISMATCH == 4
    fewer = _report(dt=("okay", "okay", "disabled"))
    assert check_probe(b, fewer)[1] == ("board boltzmann expects 3 NPU cores: found 2 enabled of 3 in the device tree"
                                        "  [not met]")
    assert probe_exit_code(b, fewer, 0) == EXIT_BOARD_MISMATCH


def test_check_probe_without_a_device_keeps_the_probe_status():
    b = load_board(BOLTZMANN)
    report = _report(nodes=0, dt=(), exit_code=2)
    assert check_probe(b, report) == [
        "board boltzmann expects driver rocket: found none  [not met]",
        "board boltzmann expects 3 NPU cores: found 0  [not met]",
        "board boltzmann expects exit status 0: found 2  [not met]",
    ]
    assert probe_exit_code(b, report, 2) == 2


def test_check_probe_does_not_judge_a_simulator_run():
    b = load_board(BOLTZMANN)
    report = _report(mode="simulator", dt=())
    assert check_probe(b, report) == ["board boltzmann: not checked against a simulator run "
                                      "(expects driver rocket, 3 NPU cores)"]
    assert probe_exit_code(b, report, 0) == 0


@pytest.fixture
def fake_probe(monkeypatch):
    """``probe`` with its hardware inspection replaced by a canned report (set ``.report``)."""
    from rosenblatt.npu import probe

    class Fake:
        report = _report()

    def collect(sim, bench):
        r = copy.deepcopy(Fake.report)
        r.update(system={"kernel": "6.18", "kernel_ok": True, "machine": "aarch64", "rocket_module_loaded": True,
                         "rocket_in_sys_module": True, "rocket_bound_devices": []},
                 clocks_power={"clk_summary_npu": [], "power_domains_npu": [], "runtime_pm": {}},
                 verdict="canned")
        return r, r.pop("exit_code")

    monkeypatch.setattr(probe, "_collect", collect)
    return Fake


def test_probe_cli_checks_the_default_board(fake_probe, monkeypatch):
    monkeypatch.delenv(FLEET_DIR_ENV, raising=False)
    monkeypatch.delenv(BOARD_ENV, raising=False)
    r = CliRunner().invoke(main, ["probe"])
    assert r.exit_code == 0, r.output
    assert "board boltzmann expects driver rocket: found rocket\n" in r.output
    fake_probe.report = _report(driver="rknpu")
    r = CliRunner().invoke(main, ["probe", "--board", str(BOLTZMANN), "--json"])
    assert r.exit_code == 4, r.output
    report = json.loads(r.output)
    assert report["exit_code"] == 4 and "found rknpu  [not met]" in report["checks"][0]
    r = CliRunner().invoke(main, ["probe", "--board", "none"])
    assert r.exit_code == 0 and "board" not in r.output


def test_probe_cli_bad_board_is_one_line_exit_2(fake_probe):
    r = CliRunner().invoke(main, ["probe", "--board", "nope"])
    assert r.exit_code == 2
    assert r.output.startswith("rosenblatt: error: ") and "nope.yaml: no such board file" in r.output
    assert len(r.output.strip().splitlines()) == 1


# ---------------------------------------------------------------- bench against the board

#: A `bench` result as run_bench returns it (numbers made up; no model is loaded).
FAKE_BENCH = {
    "model": "qwen2.5-1.5b-instruct-q4_k_m.gguf", "device": "cpu", "threads": 4, "isa": "sdot", "cpu_features": [],
    "prompt_tokens": 128, "gen_tokens": 64, "repeat": 3, "load_s": 1.5, "ttft_s": 0.9, "prefill_tok_s": 142.25,
    "batch": 1, "decode_tok_s": 12.5, "decode_tok_s_single": 12.5, "decode_tok_s_empty": 13.0, "prefill_tok_s_range": [140.0, 150.0],
    "decode_tok_s_range": [12.0, 13.0], "ttft_s_range": [0.8, 1.0], "peak_rss_mb": 1500.0, "file_mb": 1065.0,
    "kv_cache_mb": 7.0, "decode_step_s": 0.08, "decode_step_split_s": {"matmul": 0.07, "total": 0.08},
}


def test_board_table_puts_the_run_next_to_anchors_and_targets():
    b = load_board(BOLTZMANN)
    table = format_board_table(compare_bench(b, FAKE_BENCH)).splitlines()
    assert table[0].startswith("board boltzmann: anchors and targets are RK3588 figures for "
                               "qwen2.5-1.5b-instruct-q4_k_m.gguf")
    assert table[1].split() == ["prefill", "tok/s", "decode", "tok/s", "peak", "RSS"]
    assert table[2].split() == ["measured", "here", "(qwen2.5-1.5b-instruct-q4_k_m.gguf)",
                                "142.2", "12.50", "1.57", "GB"]
    assert table[3].strip() == "anchor (RK3588, from the board file):"
    assert table[4].split() == ["rkllm-w8a8", "(measured)", "338.0", "16.69", "-"]
    assert table[5].split() == ["llama.cpp-q4_0-est", "(estimate)", "85.0", "19.00", "-"]
    assert table[7].split() == ["target", "floor", "45.0", "15.00", "1.60", "GB"]
    assert table[8].split() == ["target", "stretch", "150.0", "20.00", "1.30", "GB"]
    assert len(table) == 9
    other = format_board_table(compare_bench(b, {**FAKE_BENCH, "model": "smollm2.gguf"}))
    assert other.splitlines()[-1].strip().startswith("(this run measured smollm2.gguf, not qwen2.5-1.5b")


@pytest.fixture
def fake_bench(monkeypatch):
    import rosenblatt.bench as bench
    calls = []

    def run_bench(model, **kw):
        calls.append(model)
        return dict(FAKE_BENCH)

    monkeypatch.setattr(bench, "run_bench", run_bench)
    return calls


def test_bench_cli_board_adds_the_table_and_the_json_entry(fake_bench, tmp_path):
    model = str(tmp_path / "m.gguf")
    r = CliRunner().invoke(main, ["bench", "--model", model, "--json", "--board", "boltzmann"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    board = res["board"]
    assert (board["name"], board["soc"], board["model"]) == ("boltzmann", "RK3588", "qwen2.5-1.5b-instruct-q4_k_m.gguf")
    assert board["measured"]["decode_tok_s"] == 12.5 and board["measured"]["prefill_tok_s"] == 142.25
    assert board["anchors"][0] == {"name": "rkllm-w8a8", "source": board["anchors"][0]["source"], "kind": "measured",
                                   "decode_tok_s": 16.69, "prefill_tok_s": 338.0}
    assert board["targets"]["floor"] == {"decode_tok_s": 15.0, "prefill_tok_s": 45.0, "peak_rss_gb": 1.6}
    r = CliRunner().invoke(main, ["bench", "--model", model, "--board", "boltzmann"])
    assert r.exit_code == 0, r.output
    assert "anchor (RK3588, from the board file):" in r.output and "target stretch" in r.output
    r = CliRunner().invoke(main, ["bench", "--model", model, "--json"])
    assert r.exit_code == 0 and "board" not in json.loads(r.output)
    assert fake_bench == [model] * 3


def test_bench_cli_bad_board_fails_before_loading_anything(fake_bench):
    r = CliRunner().invoke(main, ["bench", "--model", "m.gguf", "--board", "nope"])
    assert r.exit_code == 2
    assert r.output.startswith("rosenblatt: error: ") and "nope.yaml: no such board file" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert fake_bench == []


# ---------------------------------------------------------------- serve sections and fleet files


def test_repository_fleet_file_validates():
    from rosenblatt.fleet import load_any, load_fleet
    f = load_fleet(REPO / "fleet" / "lab.yaml")
    assert f.head == "boltzmann" and list(f.boards) == ["boltzmann"] and f.ray_port == 6379
    b = f.members["boltzmann"]
    assert b.serve.cpus == (4, 5, 6, 7) and b.serve.slots == 4 and b.serve.device == "cpu"
    assert b.serve_model_path().name == "qwen2.5-1.5b-instruct-q4_k_m.gguf"
    assert load_any(REPO / "fleet" / "lab.yaml").name == "lab" and load_any(BOLTZMANN).name == "boltzmann"


@pytest.mark.parametrize("change, message", [
    (lambda d: d["serve"].update(cpus=[0], threads=1), "boltzmann.yaml: serve.cpus: CPU 0 is not an A76 core (cpu.a76 = [4, 5, 6, 7])"),
    (lambda d: d["serve"].update(threads=5), "boltzmann.yaml: serve.threads: 5 threads on 4 pinned CPUs"),
    (lambda d: d["serve"].update(model="nope"), "boltzmann.yaml: serve.model: 'nope' is not a key of models.files"),
    (lambda d: d["serve"].update(device="gpu"), "boltzmann.yaml: serve.device: must be one of"),
    (lambda d: d["serve"].update(slot=2), "boltzmann.yaml: serve.slot: unknown key in serve (allowed: model, ctx"),
])
def test_serve_section_rules(tmp_path, raw, change, message):
    change(raw)
    with pytest.raises(FleetError) as e:
        load_board(write(tmp_path, raw))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_fleet_file_rules(tmp_path, raw):
    from rosenblatt.fleet import load_fleet
    write(tmp_path, raw)
    fleet = {"schema": 1, "name": "lab", "head": "boltzmann", "ray_port": 6379,
             "http": {"host": "127.0.0.1", "port": 8000}, "boards": {"boltzmann": {"address": "10.0.0.1"}}}
    p = write(tmp_path, fleet, "lab")
    assert load_fleet(p).ray_address == "10.0.0.1:6379"
    for change, message in [
        (lambda d: d.update(head="other"), "lab.yaml: head: 'other' is not a key of boards"),
        (lambda d: d["boards"].update(ghost={"address": "10.0.0.2"}), "lab.yaml: boards.ghost: no board file ghost.yaml"),
        (lambda d: d["http"].update(hots="x"), "lab.yaml: http.hots: unknown key in http (allowed: host, port)"),
    ]:
        bad = copy.deepcopy(fleet)
        change(bad)
        with pytest.raises(FleetError) as e:
            load_fleet(write(tmp_path, bad, "lab"))
        assert message in str(e.value)
    del raw["serve"]
    write(tmp_path, raw)
    with pytest.raises(FleetError, match=r"boltzmann.yaml: serve: missing: board boltzmann is in fleet lab"):
        load_fleet(write(tmp_path, fleet, "lab"))
