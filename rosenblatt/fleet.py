"""Board descriptions: ``fleet/<name>.yaml`` → :class:`Board`.

A board file says what the machine is (SoC, which CPU cores are the big A76 ones, RAM), what
kernel and device-tree setup the NPU needs, what ``python -m rosenblatt probe`` should report
there, where the models live, and how to run the benchmark plus the numbers to compare it with.
``probe`` and ``bench`` read it through :func:`default_board` / :func:`load_board`.

The YAML is read with ``yaml.safe_load`` and checked against :data:`SCHEMA` (written below in
plain Python: required keys, types, ranges, no unknown keys at any level) and then against a
few cross-field rules (the benchmark must be pinned to A76 cores, the probe must expect the
NPU's core count, ...). Any problem raises :class:`FleetError`, one line naming the file and
the dotted key at fault, e.g. ``fleet/boltzmann.yaml: npu.clock_mhz: must be > 0, got -5``.
"""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .errors import RosenblattError

__all__ = [
    "Anchor",
    "BenchSpec",
    "Board",
    "BoardInfo",
    "CpuInfo",
    "FleetError",
    "KernelInfo",
    "ModelsInfo",
    "NpuInfo",
    "ProbeExpect",
    "SCHEMA",
    "Target",
    "default_board",
    "fleet_dir",
    "load_board",
]

#: Environment variable overriding where board files are looked up (default: ``<repo>/fleet``).
FLEET_DIR_ENV = "ROSENBLATT_FLEET_DIR"
#: Environment variable naming the default board (default: ``boltzmann``).
BOARD_ENV = "ROSENBLATT_BOARD"
DEFAULT_BOARD_NAME = "boltzmann"
SCHEMA_VERSION = 1

_NAME_RE = r"^[a-z0-9][a-z0-9._-]*$"
_VERSION_RE = r"^[0-9]+\.[0-9]+(\.[0-9]+)?$"
#: Placeholders a benchmark command may use; ``{model}`` is required.
BENCH_PLACEHOLDERS = ("model", "threads", "cpus")


class FleetError(RosenblattError, ValueError):
    """A board file that cannot be used: missing, not YAML, or not matching the schema."""

    def __init__(self, path: str | os.PathLike, key: str, problem: str):
        self.path = os.fspath(path)
        self.key = key
        self.problem = " ".join(str(problem).split())  # always one line
        super().__init__(f"{self.path}: {key}: {self.problem}" if key else f"{self.path}: {self.problem}")


# --------------------------------------------------------------------------------------------
# The schema language: a handful of node types, each validating a value at a dotted key path.
# --------------------------------------------------------------------------------------------


class _Invalid(Exception):
    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem


def _tname(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            dict: "mapping", type(None): "null"}.get(type(value), type(value).__name__)


class Str:
    def __init__(self, pattern: str | None = None, choices: Sequence[str] | None = None):
        self.pattern = pattern
        self.choices = tuple(choices) if choices else None

    def check(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            hint = " (quote it in the YAML)" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
            raise _Invalid(key, f"expected a string, got {_tname(value)} {value!r}{hint}")
        if not value.strip():
            raise _Invalid(key, "must not be empty")
        if self.choices is not None and value not in self.choices:
            raise _Invalid(key, f"must be one of {', '.join(self.choices)}; got {value!r}")
        if self.pattern is not None and not re.match(self.pattern, value):
            raise _Invalid(key, f"{value!r} does not match {self.pattern}")
        return value


class Int:
    def __init__(self, lo: int | None = None, hi: int | None = None):
        self.lo = lo
        self.hi = hi

    def check(self, value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(key, f"expected an integer, got {_tname(value)} {value!r}")
        if self.lo is not None and value < self.lo:
            raise _Invalid(key, f"must be >= {self.lo}, got {value}")
        if self.hi is not None and value > self.hi:
            raise _Invalid(key, f"must be <= {self.hi}, got {value}")
        return value


class Num:
    """A real number; ``gt`` is an exclusive lower bound, ``le`` an inclusive upper one."""

    def __init__(self, gt: float | None = None, le: float | None = None):
        self.gt = gt
        self.le = le

    def check(self, value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(key, f"expected a number, got {_tname(value)} {value!r}")
        if value != value:  # NaN
            raise _Invalid(key, "must be a number, got NaN")
        if self.gt is not None and not value > self.gt:
            raise _Invalid(key, f"must be > {self.gt:g}, got {value:g}")
        if self.le is not None and not value <= self.le:
            raise _Invalid(key, f"must be <= {self.le:g}, got {value:g}")
        return float(value)


class List:
    def __init__(self, item: Any, min_len: int = 0, unique: bool = False):
        self.item = item
        self.min_len = min_len
        self.unique = unique

    def check(self, value: Any, key: str) -> list:
        if not isinstance(value, list):
            raise _Invalid(key, f"expected a list, got {_tname(value)} {value!r}")
        if len(value) < self.min_len:
            raise _Invalid(key, "must not be empty" if self.min_len == 1 else f"needs at least {self.min_len} entries")
        out = [self.item.check(v, f"{key}[{i}]") for i, v in enumerate(value)]
        if self.unique and len(set(out)) != len(out):
            raise _Invalid(key, f"entries must be unique, got {value!r}")
        return out


class Map:
    """A mapping with a fixed set of keys; ``optional`` keys may be absent (they become None)."""

    def __init__(self, fields: Mapping[str, Any], optional: Sequence[str] = ()):
        self.fields = dict(fields)
        self.optional = frozenset(optional)
        unknown = self.optional - self.fields.keys()
        assert not unknown, f"optional keys not in fields: {unknown}"

    def check(self, value: Any, key: str) -> dict:
        if not isinstance(value, dict):
            raise _Invalid(key, f"expected a mapping, got {_tname(value)} {value!r}")
        where = key or "top level"
        for k in value:
            if k not in self.fields:
                raise _Invalid(_join(key, str(k)), f"unknown key in {where} (allowed: {', '.join(self.fields)})")
        out = {}
        for k, node in self.fields.items():
            if k not in value:
                if k in self.optional:
                    out[k] = None
                    continue
                raise _Invalid(_join(key, k), f"missing required key in {where}")
            out[k] = node.check(value[k], _join(key, k))
        return out


class Dict:
    """A mapping with free keys (matching ``key_pattern``) and one value type."""

    def __init__(self, value: Any, key_pattern: str = _NAME_RE, min_len: int = 0):
        self.value = value
        self.key_pattern = key_pattern
        self.min_len = min_len

    def check(self, value: Any, key: str) -> dict:
        if not isinstance(value, dict):
            raise _Invalid(key, f"expected a mapping, got {_tname(value)} {value!r}")
        if len(value) < self.min_len:
            raise _Invalid(key, "must not be empty")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or not re.match(self.key_pattern, k):
                raise _Invalid(_join(key, str(k)), f"bad name {k!r} (must match {self.key_pattern})")
            out[k] = self.value.check(v, _join(key, k))
        return out


def _join(prefix: str, k: str) -> str:
    return f"{prefix}.{k}" if prefix else k


_CORE_IDS = List(Int(0, 1023), min_len=1, unique=True)
_TOK_S = Num(gt=0, le=1e6)

#: The board-file schema. Every key is required unless listed as optional; unknown keys fail.
SCHEMA = Map({
    "schema": Int(SCHEMA_VERSION, SCHEMA_VERSION),
    "name": Str(_NAME_RE),
    "board": Map({
        "vendor": Str(),
        "model": Str(),
        "dtb": Str(r"^[A-Za-z0-9_./-]+\.dtb$"),
        "boot": Str(),
    }),
    "soc": Map({
        "name": Str(),
        "npu_cores": Int(1, 16),
    }),
    "cpu": Map({
        "a76": _CORE_IDS,
        "a55": List(Int(0, 1023), unique=True),
        "a76_max_mhz": Int(1, 10000),
        "a55_max_mhz": Int(1, 10000),
    }),
    "memory": Map({
        "ram_gib": Num(gt=0, le=4096),
    }),
    "kernel": Map({
        "min_version": Str(_VERSION_RE),
        "board_dt_enables_npu_from": Str(_VERSION_RE),
        "config_fragment": Str(),
        "overlay": Str(),
        "module": Str(_NAME_RE),
    }),
    "npu": Map({
        "driver": Str(_NAME_RE),
        "device": Str(r"^/dev/"),
        "cores": Int(1, 16),
        "clock_mhz": Num(gt=0, le=5000),
        "clock_name": Str(),
    }),
    "models": Map({
        "dir": Str(),
        "default": Str(_NAME_RE),
        "files": Dict(Str(r"^[^/\\]+\.gguf$"), min_len=1),
    }),
    "probe": Map({
        "command": List(Str(), min_len=1),
        "expect": Map({
            "exit_code": Int(0, 255),
            "driver": Str(_NAME_RE),
            "cores": Int(1, 16),
        }),
    }),
    "bench": Map({
        "cpus": _CORE_IDS,
        "threads": Int(1, 1024),
        "model": Str(_NAME_RE),
        "command": List(Str(), min_len=1),
        "anchors": List(Map({
            "name": Str(_NAME_RE),
            "source": Str(),
            "kind": Str(choices=("measured", "estimate")),
            "decode_tok_s": _TOK_S,
            "prefill_tok_s": _TOK_S,
        }, optional=("decode_tok_s", "prefill_tok_s")), min_len=1),
        "targets": Dict(Map({
            "decode_tok_s": _TOK_S,
            "prefill_tok_s": _TOK_S,
            "peak_rss_gb": Num(gt=0, le=4096),
        }), min_len=1),
    }),
})


# --------------------------------------------------------------------------------------------
# The typed result.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BoardInfo:
    vendor: str
    model: str
    dtb: str  #: DTB the board boots, relative to the kernel's dtbs directory
    boot: str  #: boot path (firmware / boot loader), free text


@dataclass(frozen=True)
class CpuInfo:
    a76: tuple[int, ...]  #: logical CPU ids of the big cores (benchmarks pin here)
    a55: tuple[int, ...]  #: logical CPU ids of the little cores
    a76_max_mhz: int
    a55_max_mhz: int


@dataclass(frozen=True)
class KernelInfo:
    min_version: str  #: oldest mainline kernel with the NPU driver + DT nodes
    board_dt_enables_npu_from: str  #: first kernel whose board DT enables the NPU (no overlay)
    config_fragment: str  #: repo-relative path
    overlay: str  #: repo-relative path of the .dtso
    module: str


@dataclass(frozen=True)
class NpuInfo:
    driver: str
    device: str
    cores: int
    clock_mhz: float  #: the NPU clock we expect to read (DT-assigned rate unless raised)
    clock_name: str  #: its name in the clock framework (debugfs clk_summary)


@dataclass(frozen=True)
class ModelsInfo:
    dir: str  #: as written (may contain ~ or $VARS)
    default: str  #: key into ``files``
    files: Mapping[str, str]  #: model key -> file name inside ``dir``


@dataclass(frozen=True)
class ProbeExpect:
    command: tuple[str, ...]
    exit_code: int
    driver: str
    cores: int


@dataclass(frozen=True)
class Anchor:
    name: str
    source: str
    kind: str  #: "measured" (published/ours) or "estimate" (scaled from other models)
    decode_tok_s: float | None
    prefill_tok_s: float | None


@dataclass(frozen=True)
class Target:
    name: str
    decode_tok_s: float
    prefill_tok_s: float
    peak_rss_gb: float


@dataclass(frozen=True)
class BenchSpec:
    cpus: tuple[int, ...]
    threads: int
    model: str  #: key into ``Board.models.files``
    command: tuple[str, ...]  #: argv template with {model}, {threads}, {cpus}
    anchors: tuple[Anchor, ...]
    targets: Mapping[str, Target]


@dataclass(frozen=True)
class Board:
    path: Path  #: the YAML file this was read from
    name: str
    board: BoardInfo
    soc_name: str
    soc_npu_cores: int
    cpu: CpuInfo
    ram_gib: float
    kernel: KernelInfo
    npu: NpuInfo
    models: ModelsInfo
    probe: ProbeExpect
    bench: BenchSpec

    @property
    def root(self) -> Path:
        """The directory repo-relative paths (kernel.overlay, ...) are relative to."""
        return self.path.resolve().parent.parent

    def repo_path(self, rel: str) -> Path:
        return self.root / rel

    @property
    def models_dir(self) -> Path:
        return Path(os.path.expandvars(os.path.expanduser(self.models.dir)))

    def model_path(self, key: str | None = None) -> Path:
        """Where model ``key`` (default: ``models.default``) is expected on this board."""
        key = key or self.models.default
        try:
            name = self.models.files[key]
        except KeyError:
            raise FleetError(self.path, "models.files", f"no model named {key!r} (have: {', '.join(self.models.files)})") from None
        return self.models_dir / name

    def bench_argv(self, model_path: str | os.PathLike | None = None) -> list[str]:
        """The benchmark command with its placeholders filled in."""
        model = os.fspath(model_path) if model_path is not None else os.fspath(self.model_path(self.bench.model))
        values = {"model": model, "threads": str(self.bench.threads), "cpus": cpu_list(self.bench.cpus)}
        return [arg.format(**values) for arg in self.bench.command]

    def anchor(self, name: str) -> Anchor:
        for a in self.bench.anchors:
            if a.name == name:
                return a
        raise KeyError(name)


def cpu_list(cpus: Sequence[int]) -> str:
    """``[4, 5, 6, 7]`` → ``"4-7"``; ``[0, 2, 3]`` → ``"0,2-3"`` (taskset -c syntax)."""
    out: list[str] = []
    ids = sorted(set(cpus))
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


# --------------------------------------------------------------------------------------------
# Cross-field rules (after the schema has checked every value on its own).
# --------------------------------------------------------------------------------------------


def _template_fields(arg: str, key: str) -> set[str]:
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(arg) if f is not None}
    except ValueError as exc:
        raise _Invalid(key, f"bad placeholder in {arg!r}: {exc}") from None
    bad = names - set(BENCH_PLACEHOLDERS)
    if bad:
        raise _Invalid(key, f"unknown placeholder {{{sorted(bad)[0]}}} in {arg!r} (allowed: "
                            + ", ".join("{" + p + "}" for p in BENCH_PLACEHOLDERS) + ")")
    return names


def _cross_check(d: dict, stem: str | None) -> None:
    if stem is not None and d["name"] != stem:
        raise _Invalid("name", f"must match the file name {stem!r}, got {d['name']!r}")
    cpu = d["cpu"]
    overlap = sorted(set(cpu["a76"]) & set(cpu["a55"]))
    if overlap:
        raise _Invalid("cpu.a55", f"CPU {overlap[0]} is listed as both A76 and A55")
    if d["npu"]["cores"] > d["soc"]["npu_cores"]:
        raise _Invalid("npu.cores", f"{d['npu']['cores']} exceeds soc.npu_cores = {d['soc']['npu_cores']}")
    if d["probe"]["expect"]["cores"] != d["npu"]["cores"]:
        raise _Invalid("probe.expect.cores", f"is {d['probe']['expect']['cores']} but npu.cores is {d['npu']['cores']}")
    if d["probe"]["expect"]["driver"] != d["npu"]["driver"]:
        raise _Invalid("probe.expect.driver", f"is {d['probe']['expect']['driver']!r} but npu.driver is {d['npu']['driver']!r}")
    if d["models"]["default"] not in d["models"]["files"]:
        raise _Invalid("models.default", f"{d['models']['default']!r} is not a key of models.files")
    bench = d["bench"]
    not_big = sorted(set(bench["cpus"]) - set(cpu["a76"]))
    if not_big:
        raise _Invalid("bench.cpus", f"CPU {not_big[0]} is not an A76 core (cpu.a76 = {cpu['a76']})")
    if bench["threads"] > len(bench["cpus"]):
        raise _Invalid("bench.threads", f"{bench['threads']} threads on {len(bench['cpus'])} pinned CPUs")
    if bench["model"] not in d["models"]["files"]:
        raise _Invalid("bench.model", f"{bench['model']!r} is not a key of models.files")
    used: set[str] = set()
    for i, arg in enumerate(bench["command"]):
        used |= _template_fields(arg, f"bench.command[{i}]")
    if "model" not in used:
        raise _Invalid("bench.command", "must contain the {model} placeholder")
    names = [a["name"] for a in bench["anchors"]]
    for i, a in enumerate(bench["anchors"]):
        if a["decode_tok_s"] is None and a["prefill_tok_s"] is None:
            raise _Invalid(f"bench.anchors[{i}]", "needs decode_tok_s or prefill_tok_s")
        if names.index(a["name"]) != i:
            raise _Invalid(f"bench.anchors[{i}].name", f"duplicate anchor name {a['name']!r}")


def _build(path: Path, d: dict) -> Board:
    b = d["bench"]
    return Board(
        path=path,
        name=d["name"],
        board=BoardInfo(**d["board"]),
        soc_name=d["soc"]["name"],
        soc_npu_cores=d["soc"]["npu_cores"],
        cpu=CpuInfo(a76=tuple(d["cpu"]["a76"]), a55=tuple(d["cpu"]["a55"]),
                    a76_max_mhz=d["cpu"]["a76_max_mhz"], a55_max_mhz=d["cpu"]["a55_max_mhz"]),
        ram_gib=d["memory"]["ram_gib"],
        kernel=KernelInfo(**d["kernel"]),
        npu=NpuInfo(**d["npu"]),
        models=ModelsInfo(dir=d["models"]["dir"], default=d["models"]["default"], files=dict(d["models"]["files"])),
        probe=ProbeExpect(command=tuple(d["probe"]["command"]), **d["probe"]["expect"]),
        bench=BenchSpec(
            cpus=tuple(b["cpus"]), threads=b["threads"], model=b["model"], command=tuple(b["command"]),
            anchors=tuple(Anchor(**a) for a in b["anchors"]),
            targets={k: Target(name=k, **v) for k, v in b["targets"].items()},
        ),
    )


# --------------------------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------------------------


def fleet_dir() -> Path:
    """Where board files live: ``$ROSENBLATT_FLEET_DIR`` or the repository's ``fleet/``.

    ``fleet/`` sits next to the package directory in the source tree (it is not installed
    with the package), so from a wheel install it may simply not exist.
    """
    env = os.environ.get(FLEET_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "fleet"


def _resolve(path_or_name: str | os.PathLike) -> tuple[Path, str | None]:
    """(file path, expected stem or None). A bare name is looked up in :func:`fleet_dir`."""
    s = os.fspath(path_or_name)
    looks_like_path = isinstance(path_or_name, os.PathLike) or os.sep in s or "/" in s or s.endswith((".yaml", ".yml"))
    if looks_like_path:
        p = Path(s)
        return p, p.stem
    if not re.match(_NAME_RE, s):
        raise FleetError(fleet_dir(), "", f"bad board name {s!r} (must match {_NAME_RE})")
    return fleet_dir() / f"{s}.yaml", s


def load_board(path_or_name: str | os.PathLike) -> Board:
    """Read and validate a board file, given its path or its name (``"boltzmann"``)."""
    path, stem = _resolve(path_or_name)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FleetError(path, "", "no such board file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FleetError(path, "", f"cannot read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc)
        raise FleetError(path, "", f"not valid YAML{where}: {what}") from None
    if data is None:
        raise FleetError(path, "", "file is empty")
    try:
        checked = SCHEMA.check(data, "")
        _cross_check(checked, stem)
    except _Invalid as inv:
        raise FleetError(path, inv.key, inv.problem) from None
    return _build(path, checked)


def default_board() -> Board | None:
    """The board to use when none is named: ``$ROSENBLATT_BOARD`` or ``boltzmann``.

    Returns None when that board's file does not exist (e.g. an installed package without the
    repository's ``fleet/`` directory); a file that exists but is invalid still raises
    :class:`FleetError`.
    """
    name = os.environ.get(BOARD_ENV) or DEFAULT_BOARD_NAME
    path, _ = _resolve(name)
    if not path.is_file():
        return None
    return load_board(name)
