"""fleet/<board>.yaml → rosenblatt.fleet.Board: the repository's file and the schema checks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from rosenblatt.errors import RosenblattError
from rosenblatt.fleet import (
    BOARD_ENV,
    FLEET_DIR_ENV,
    FleetError,
    cpu_list,
    default_board,
    fleet_dir,
    load_board,
)

REPO = Path(__file__).resolve().parent.parent
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
    assert b.soc_name == "RK3588"
    assert b.cpu.a76 == (4, 5, 6, 7) and b.cpu.a55 == (0, 1, 2, 3)
    assert b.npu.driver == "rocket" and b.npu.cores == 3 and b.npu.device == "/dev/accel/accel0"
    assert b.npu.clock_mhz == 200
    assert (b.probe.exit_code, b.probe.driver, b.probe.cores) == (0, "rocket", 3)
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
