"""Board descriptions: ``fleet/<name>.yaml`` → :class:`Board`.

A board file says what the machine is (SoC, which CPU cores are the big A76 ones, RAM), what
kernel and device-tree setup the NPU needs, what ``python -m rosenblatt probe`` should report
there, where the models live, and how to run the benchmark plus the numbers to compare it with.
``probe`` checks what it found against ``probe.expect`` (:func:`check_probe`, the default board
unless ``--board``); ``bench --board NAME`` puts its figures next to ``bench.anchors`` and
``bench.targets`` (:func:`compare_bench`).

The pydantic models below are the one declaration of the format: the YAML (read with
``yaml.safe_load``) is validated by :class:`Board` and the result is that same object. Every key
is required unless it has a default, unknown keys fail at every level, scalars are strict (a
string is not an integer), and validators carry the cross-field rules (the benchmark is pinned
to A76 cores, the probe expects the NPU's core count, ...). Any problem raises
:class:`FleetError`, one line naming the file and the dotted key at fault, e.g.
``fleet/boltzmann.yaml: npu.clock_mhz: must be > 0, got -5``.

A board's optional ``serve`` section says what it serves in a fleet (model, context, slots, the A76
cores and threads, the device); a fleet file (:class:`Fleet`, told apart from a board file by its
``boards`` key) names the boards serving one model behind one endpoint, where each one's Ray node
listens and which is the head. :func:`load_fleet` reads it and the board files beside it; the Ray
side lives in :mod:`rosenblatt.serve.fleet` (this module never imports ray).
"""

from __future__ import annotations

import os
import re
import string
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .errors import RosenblattError

__all__ = [
    "Anchor", "Bench", "Board", "BoardInfo", "Cpu", "Fleet", "FleetBoard", "FleetError", "Http", "Kernel",
    "Memory", "Models", "Npu", "Probe", "ProbeExpect", "Serve", "Soc", "Target", "check_files", "check_probe",
    "compare_bench", "cpu_list", "default_board", "fleet_dir", "is_fleet_file", "load_any", "load_board",
    "load_fleet", "probe_exit_code",
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
    """A board file that cannot be used: missing, not YAML, or not a valid board description."""

    def __init__(self, path: str | os.PathLike, key: str, problem: str):
        self.path = os.fspath(path)
        self.key = key
        self.problem = " ".join(str(problem).split())  # always one line
        super().__init__(f"{self.path}: {key}: {self.problem}" if key else f"{self.path}: {self.problem}")


# --- Value types and rules.


def _rule(problem: str, *at: str | int) -> PydanticCustomError:
    """A broken rule; ``at`` extends the error's location down to the key the problem is about."""
    return PydanticCustomError("board_rule", "{problem}", {"problem": problem, "at": at})


def _not_blank(s: str) -> str:
    if not s.strip():
        raise _rule("must not be empty")
    return s


def _unique(v: tuple) -> tuple:
    if len(set(v)) != len(v):
        raise _rule(f"entries must be unique, got {list(v)}")
    return v


def _placeholders(arg: str) -> set[str]:
    try:
        return {f for _, f, _, _ in string.Formatter().parse(arg) if f is not None}
    except ValueError as exc:
        raise _rule(f"bad placeholder in {arg!r}: {exc}") from None


def _known_placeholders(arg: str) -> str:
    bad = _placeholders(arg) - set(BENCH_PLACEHOLDERS)
    if bad:
        raise _rule(f"unknown placeholder {{{sorted(bad)[0]}}} in {arg!r} (allowed: "
                    + ", ".join("{" + p + "}" for p in BENCH_PLACEHOLDERS) + ")")
    return arg


Text = Annotated[StrictStr, AfterValidator(_not_blank)]
Name = Annotated[StrictStr, Field(pattern=_NAME_RE)]
Version = Annotated[StrictStr, Field(pattern=_VERSION_RE)]
CoreIds = Annotated[tuple[Annotated[StrictInt, Field(ge=0, le=1023)], ...], AfterValidator(_unique)]  #: logical CPU ids
NpuCores = Annotated[StrictInt, Field(ge=1, le=16)]
Mhz = Annotated[StrictInt, Field(ge=1, le=10000)]
#: real numbers (StrictFloat takes a YAML integer too, never a string or a boolean)
TokS = Annotated[StrictFloat, Field(gt=0, le=1e6)]
Gib = Annotated[StrictFloat, Field(gt=0, le=4096)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --- The board file, section by section (field names = YAML keys).


class BoardInfo(_Section):
    vendor: Text
    model: Text
    dtb: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_./-]+\.dtb$")]  #: relative to the kernel's dtbs dir
    boot: Text  #: boot path (firmware / boot loader), free text


class Soc(_Section):
    name: Text
    npu_cores: NpuCores


class Cpu(_Section):
    a76: Annotated[CoreIds, Field(min_length=1)]  #: the big cores (benchmarks pin here)
    a55: CoreIds  #: the little cores
    a76_max_mhz: Mhz
    a55_max_mhz: Mhz

    @model_validator(mode="after")
    def _disjoint(self):
        overlap = sorted(set(self.a76) & set(self.a55))
        if overlap:
            raise _rule(f"CPU {overlap[0]} is listed as both A76 and A55", "a55")
        return self


class Memory(_Section):
    ram_gib: Gib


class Kernel(_Section):
    min_version: Version  #: oldest mainline kernel with the NPU driver + DT nodes
    board_dt_enables_npu_from: Version  #: first kernel whose board DT enables the NPU (no overlay)
    config_fragment: Text  #: repo-relative path
    overlay: Text  #: repo-relative path of the .dtso
    module: Name


class Npu(_Section):
    driver: Name
    device: Annotated[StrictStr, Field(pattern=r"^/dev/")]
    cores: NpuCores
    #: the NPU clock we expect to read (DT-assigned rate unless raised)
    clock_mhz: Annotated[StrictFloat, Field(gt=0, le=5000)]
    clock_name: Text  #: its name in the clock framework (debugfs clk_summary)


class Models(_Section):
    dir: Text  #: as written (may contain ~ or $VARS)
    default: Name  #: key into ``files``
    files: Annotated[dict[Name, Annotated[StrictStr, Field(pattern=r"^[^/\\]+\.gguf$")]], Field(min_length=1)]

    @model_validator(mode="after")
    def _default_exists(self):
        if self.default not in self.files:
            raise _rule(f"{self.default!r} is not a key of models.files", "default")
        return self


class ProbeExpect(_Section):
    exit_code: Annotated[StrictInt, Field(ge=0, le=255)]
    driver: Name
    cores: NpuCores


class Probe(_Section):
    command: Annotated[tuple[Text, ...], Field(min_length=1)]
    expect: ProbeExpect


class Anchor(_Section):
    name: Name
    source: Text
    kind: Literal["measured", "estimate"]  #: published/ours, or scaled from other models
    decode_tok_s: TokS | None = None
    prefill_tok_s: TokS | None = None

    @model_validator(mode="after")
    def _has_a_number(self):
        if self.decode_tok_s is None and self.prefill_tok_s is None:
            raise _rule("needs decode_tok_s or prefill_tok_s")
        return self


class Target(_Section):
    decode_tok_s: TokS
    prefill_tok_s: TokS
    peak_rss_gb: Gib


class Bench(_Section):
    cpus: Annotated[CoreIds, Field(min_length=1)]
    threads: Annotated[StrictInt, Field(ge=1, le=1024)]
    model: Name  #: key into ``Board.models.files``
    #: argv template with {model}, {threads}, {cpus}
    command: Annotated[tuple[Annotated[Text, AfterValidator(_known_placeholders)], ...], Field(min_length=1)]
    anchors: Annotated[tuple[Anchor, ...], Field(min_length=1)]
    targets: Annotated[dict[Name, Target], Field(min_length=1)]

    @model_validator(mode="after")
    def _consistent(self):
        if self.threads > len(self.cpus):
            raise _rule(f"{self.threads} threads on {len(self.cpus)} pinned CPUs", "threads")
        if not any("model" in _placeholders(arg) for arg in self.command):
            raise _rule("must contain the {model} placeholder", "command")
        names = [a.name for a in self.anchors]
        for i, name in enumerate(names):
            if names.index(name) != i:
                raise _rule(f"duplicate anchor name {name!r}", "anchors", i, "name")
        return self


#: matmul backends a board may serve with (``Engine.load(device=...)``)
DEVICES = ("cpu", "npu", "npu-sim", "auto")


class Serve(_Section):
    """What the board serves as a member of a fleet (``rosenblatt serve --fleet``)."""

    model: Name  #: key into ``models.files``
    ctx: Annotated[StrictInt, Field(ge=16, le=1 << 20)]  #: context per slot, in tokens
    slots: Annotated[StrictInt, Field(ge=1, le=256)]  #: generations at once (the server's --parallel)
    cpus: Annotated[CoreIds, Field(min_length=1)]  #: the replica is pinned here (A76 cores)
    threads: Annotated[StrictInt, Field(ge=1, le=1024)]
    device: Literal[DEVICES]  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _threads_fit(self):
        if self.threads > len(self.cpus):
            raise _rule(f"{self.threads} threads on {len(self.cpus)} pinned CPUs", "threads")
        return self


class Board(_Section):
    """One board file. Sections and keys are the YAML's; :attr:`path` is the file it came from."""

    schema_version: Annotated[StrictInt, Field(ge=SCHEMA_VERSION, le=SCHEMA_VERSION, alias="schema")]
    name: Name
    board: BoardInfo
    soc: Soc
    cpu: Cpu
    memory: Memory
    kernel: Kernel
    npu: Npu
    models: Models
    probe: Probe
    bench: Bench
    serve: Serve | None = None  #: only boards that serve in a fleet need it

    _path: Path | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _cross_check(self, info: ValidationInfo):
        stem = (info.context or {}).get("stem")
        if stem is not None and self.name != stem:
            raise _rule(f"must match the file name {stem!r}, got {self.name!r}", "name")
        if self.npu.cores > self.soc.npu_cores:
            raise _rule(f"{self.npu.cores} exceeds soc.npu_cores = {self.soc.npu_cores}", "npu", "cores")
        expect = self.probe.expect
        if expect.cores != self.npu.cores:
            raise _rule(f"is {expect.cores} but npu.cores is {self.npu.cores}", "probe", "expect", "cores")
        if expect.driver != self.npu.driver:
            raise _rule(f"is {expect.driver!r} but npu.driver is {self.npu.driver!r}", "probe", "expect", "driver")
        not_big = sorted(set(self.bench.cpus) - set(self.cpu.a76))
        if not_big:
            raise _rule(f"CPU {not_big[0]} is not an A76 core (cpu.a76 = {list(self.cpu.a76)})", "bench", "cpus")
        if self.bench.model not in self.models.files:
            raise _rule(f"{self.bench.model!r} is not a key of models.files", "bench", "model")
        if self.serve is not None:
            not_big = sorted(set(self.serve.cpus) - set(self.cpu.a76))
            if not_big:
                raise _rule(f"CPU {not_big[0]} is not an A76 core (cpu.a76 = {list(self.cpu.a76)})", "serve", "cpus")
            if self.serve.model not in self.models.files:
                raise _rule(f"{self.serve.model!r} is not a key of models.files", "serve", "model")
        return self

    @property
    def path(self) -> Path | None:
        """The YAML file this was read from (None for a board validated from plain data)."""
        return self._path

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
            raise FleetError(self.path or self.name, "models.files",
                             f"no model named {key!r} (have: {', '.join(self.models.files)})") from None
        return self.models_dir / name

    def bench_argv(self, model_path: str | os.PathLike | None = None) -> list[str]:
        """The benchmark command with its placeholders filled in."""
        model = os.fspath(model_path) if model_path is not None else os.fspath(self.model_path(self.bench.model))
        values = {"model": model, "threads": str(self.bench.threads), "cpus": cpu_list(self.bench.cpus)}
        return [arg.format(**values) for arg in self.bench.command]

    def serve_model_path(self) -> Path:
        """The model file this board serves in a fleet (its ``serve.model``)."""
        if self.serve is None:
            raise FleetError(self.path or self.name, "serve", "this board has no serve section")
        return self.model_path(self.serve.model)

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


# --- The fleet file: boards serving one model behind one endpoint.

Port = Annotated[StrictInt, Field(ge=1, le=65535)]
Address = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9]([A-Za-z0-9.:-]*[A-Za-z0-9])?$")]


class FleetBoard(_Section):
    address: Address  #: host name or IP address the board's Ray node listens on


class Http(_Section):
    host: Address  #: where the HTTP endpoint listens (on the head)
    port: Annotated[StrictInt, Field(ge=0, le=65535)]  #: 0 = any free port


class Fleet(_Section):
    """One fleet file: ``boards`` maps board names (``<name>.yaml`` beside the fleet file) to
    where they are; :attr:`members` are those board files, loaded and checked."""

    schema_version: Annotated[StrictInt, Field(ge=SCHEMA_VERSION, le=SCHEMA_VERSION, alias="schema")]
    name: Name
    head: Name  #: the board whose Ray node is the head (controller, HTTP endpoint)
    ray_port: Port  #: the head's Ray (GCS) port
    http: Http
    boards: Annotated[dict[Name, FleetBoard], Field(min_length=1)]

    _path: Path | None = PrivateAttr(None)
    _members: dict[str, Board] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _cross_check(self, info: ValidationInfo):
        stem = (info.context or {}).get("stem")
        if stem is not None and self.name != stem:
            raise _rule(f"must match the file name {stem!r}, got {self.name!r}", "name")
        if self.head not in self.boards:
            raise _rule(f"{self.head!r} is not a key of boards", "head")
        return self

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def members(self) -> dict[str, Board]:
        """Board name → its board file (validated, with a ``serve`` section)."""
        return dict(self._members)

    @property
    def ray_address(self) -> str:
        return f"{self.boards[self.head].address}:{self.ray_port}"


def is_fleet_file(data: Any) -> bool:
    """A fleet file is a mapping with a ``boards`` key; anything else is read as a board file."""
    return isinstance(data, dict) and "boards" in data


def is_local_address(address: str) -> bool:
    """Whether ``address`` is this machine as far as can be told without a name lookup: a
    loopback address, ``localhost`` or this host's name."""
    import ipaddress
    import socket
    if address.lower() in ("localhost", socket.gethostname().lower()):
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


# --- pydantic's first error → "<dotted.key>: <problem>".


def _dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _tname(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            dict: "mapping", type(None): "null"}.get(type(value), type(value).__name__)


def _g(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _section_at(loc: Sequence[str | int], root: type[BaseModel] = Board) -> type[BaseModel] | None:
    """The model class validating the mapping at ``loc`` (to list its keys), if there is one."""
    tp: Any = root
    for part in loc:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            fields = {f.alias or n: f.annotation for n, f in tp.model_fields.items()}
            if part not in fields:
                return None
            tp = fields[part]
        elif typing.get_origin(tp) in (tuple, dict):
            tp = typing.get_args(tp)[-1 if typing.get_origin(tp) is dict else 0]
        else:
            return None
        while typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):      # an optional section
            tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


#: pydantic's error types → the problem, formatted with the error's ctx (numbers as ``:g``) and
#: {where} (the parent key), {got} ("got string 'x'"), {v} (the value), {r} (its repr)
_PROBLEMS = {
    "missing": "missing required key in {where}",
    "extra_forbidden": "unknown key in {where}{allowed}",
    "int_type": "expected an integer, {got}",
    "float_type": "expected a number, {got}",
    "string_type": "expected a string, {got}{quote}",
    "tuple_type": "expected a list, {got}",
    "model_type": "expected a mapping, {got}",
    "dict_type": "expected a mapping, {got}",
    "finite_number": "must be a finite number, got {v}",
    "greater_than": "must be > {gt}, got {v}",
    "greater_than_equal": "must be >= {ge}, got {v}",
    "less_than_equal": "must be <= {le}, got {v}",
    "too_short": "must not be empty",  # every length limit of the format is "at least one"
    "string_pattern_mismatch": "{r} does not match {pattern}",
    "literal_error": "must be one of {expected}; got {r}",
}


def _describe(err: dict, root: type[BaseModel] = Board) -> tuple[str, str]:
    """(dotted key, one-line problem) for one entry of ``ValidationError.errors()``."""
    loc, kind, ctx, value = tuple(err["loc"]), err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "board_rule":
        return _dotted(loc + tuple(ctx["at"])), ctx["problem"]
    if loc and loc[-1] == "[key]":  # a key of a free-keyed mapping (models.files, bench.targets)
        return _dotted(loc[:-1]), f"bad name {value!r} (must be a string matching {_NAME_RE})"
    section = _section_at(loc[:-1], root) if kind == "extra_forbidden" else None
    allowed = ", ".join(f.alias or n for n, f in section.model_fields.items()) if section else ""
    quote = isinstance(value, (int, float)) and not isinstance(value, bool)
    fields = {k: _g(x) for k, x in ctx.items()} | {
        "where": _dotted(loc[:-1]) or "top level", "v": _g(value), "r": repr(value), "msg": err["msg"],
        "got": "got null" if value is None else f"got {_tname(value)} {value!r}",
        "allowed": f" (allowed: {allowed})" if allowed else "", "quote": " (quote it in the YAML)" if quote else ""}
    return _dotted(loc), _PROBLEMS.get(kind, "{msg}, {got}").format(**fields)


# --- Loading.


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


def _is_board_file(path: Path) -> bool:
    """Not a fleet file (no top-level ``boards`` key), as far as a glance tells."""
    try:
        return re.search(r"^boards\s*:", path.read_text(encoding="utf-8"), re.M) is None
    except (OSError, UnicodeDecodeError):
        return False


def _read(path: Path, what: str = "board file") -> Any:
    """The YAML data of ``path`` (not None), or a FleetError saying why not."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        known = sorted(p.stem for p in path.parent.glob("*.yaml") if _is_board_file(p)) \
            if path.parent == fleet_dir() else []
        raise FleetError(path, "", f"no such {what}"
                         + (f" (boards here: {', '.join(known)})" if known else "")) from None
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
    return data


def _validate_board(path: Path, stem: str | None, data: Any) -> Board:
    try:
        board = Board.model_validate(data, context={"stem": stem})
    except ValidationError as exc:
        raise FleetError(path, *_describe(exc.errors(include_url=False)[0])) from None
    board._path = path
    return board


def load_board(path_or_name: str | os.PathLike) -> Board:
    """Read and validate a board file, given its path or its name (``"boltzmann"``)."""
    path, stem = _resolve(path_or_name)
    return _validate_board(path, stem, _read(path))


def _validate_fleet(path: Path, data: Any) -> Fleet:
    try:
        fleet = Fleet.model_validate(data, context={"stem": path.stem})
    except ValidationError as exc:
        raise FleetError(path, *_describe(exc.errors(include_url=False)[0], Fleet)) from None
    fleet._path = path
    members: dict[str, Board] = {}
    model_file = None
    for name in fleet.boards:
        board_path = path.parent / f"{name}.yaml"
        if not board_path.is_file():
            raise FleetError(path, f"boards.{name}", f"no board file {board_path.name} beside the fleet file")
        board = load_board(board_path)         # its own errors name its own file
        if board.serve is None:
            raise FleetError(board_path, "serve", f"missing: board {name} is in fleet {fleet.name} "
                                                  "but does not say what it serves")
        file = board.models.files[board.serve.model]
        if model_file is None:
            model_file = (name, file)
        elif file != model_file[1]:
            raise FleetError(board_path, "serve.model", f"serves {file} but board {model_file[0]} serves "
                                                        f"{model_file[1]}; a fleet serves one model")
        members[name] = board
    fleet._members = members
    return fleet


def load_fleet(path: str | os.PathLike) -> Fleet:
    """Read and validate a fleet file and the board files it names (``<name>.yaml`` beside it);
    each board must have a ``serve`` section, and all serve the same model file."""
    path = Path(path)
    data = _read(path, "fleet file")
    if not is_fleet_file(data):
        raise FleetError(path, "boards", "missing: not a fleet file (a fleet file lists its boards)")
    return _validate_fleet(path, data)


def load_any(path: str | os.PathLike) -> Board | Fleet:
    """A board file or a fleet file (told apart by the ``boards`` key), read and validated."""
    path = Path(path)
    data = _read(path, "file")
    return _validate_fleet(path, data) if is_fleet_file(data) else _validate_board(path, path.stem, data)


def check_files(fleet: Fleet, only_local: bool = True) -> None:
    """The model file each board serves exists (FleetError naming the board file and
    ``serve.model`` if not); with ``only_local``, only for the boards at a local address (the
    others' files are on their own disks, and their replicas report a missing one)."""
    for name, board in fleet.members.items():
        if only_local and not is_local_address(fleet.boards[name].address):
            continue
        p = board.serve_model_path()
        if not p.is_file():
            raise FleetError(board.path or name, "serve.model", f"model file {p} not found")


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


# --- What probe and bench do with a board.

#: ``probe`` exit status when the NPU works but is not what the board file describes.
EXIT_BOARD_MISMATCH = 4


def _probe_expectations(board: Board, report: dict) -> list[tuple[bool, str, str]]:
    """(met, what was expected, what was found) per ``probe.expect`` entry, from a probe report
    (the dict ``rosenblatt.npu.probe`` prints as JSON)."""
    expect = board.probe.expect
    version = (report.get("device") or {}).get("version") or {}
    drivers = [version["name"]] if version.get("name") else sorted(
        {n.get("version", {}).get("name") or n.get("sysfs_driver") for n in report.get("accel_nodes", [])} - {None})
    dt = report.get("device_tree", [])
    enabled = sum(1 for c in dt if c.get("status") in ("okay", "ok"))
    cores = f"{enabled}" + (f" enabled of {len(dt)} in the device tree" if len(dt) != enabled else "")
    code = report.get("exit_code")
    return [
        (drivers == [expect.driver], f"driver {expect.driver}", ", ".join(drivers) or "none"),
        (enabled == expect.cores, f"{expect.cores} NPU cores", cores),
        (code == expect.exit_code, f"exit status {expect.exit_code}", "none" if code is None else str(code)),
    ]


def check_probe(board: Board, report: dict) -> list[str]:
    """One line per ``probe.expect`` entry: what the board file expects and what the probe found."""
    if report.get("mode") == "simulator":
        return [f"board {board.name}: not checked against a simulator run "
                f"(expects driver {board.probe.expect.driver}, {board.probe.expect.cores} NPU cores)"]
    return [f"board {board.name} expects {what}: found {found}" + ("" if met else "  [not met]")
            for met, what, found in _probe_expectations(board, report)]


def probe_exit_code(board: Board, report: dict, code: int) -> int:
    """The probe's exit status with the board checked: unchanged, except that a probe that passed
    (0) on a machine with an accel device whose driver or core count differs from the board
    file's gives :data:`EXIT_BOARD_MISMATCH`. Without a device the probe's own status (2) stays."""
    if code != 0 or report.get("mode") == "simulator" or not report.get("accel_nodes"):
        return code
    driver_ok, cores_ok = (met for met, _, _ in _probe_expectations(board, report)[:2])
    return code if driver_ok and cores_ok else EXIT_BOARD_MISMATCH


def compare_bench(board: Board, res: dict) -> dict:
    """A ``bench`` result next to the board file's numbers (the JSON's ``"board"`` entry).

    The anchors and targets are figures for the board (RK3588), measured or estimated by others
    and written in its file; they are not measured by this run."""
    bench = board.bench
    return {
        "name": board.name,
        "file": os.fspath(board.path) if board.path else None,
        "soc": board.soc.name,
        "model": board.models.files[bench.model],
        "measured": {"model": res.get("model"), "prefill_tok_s": res.get("prefill_tok_s"),
                     "decode_tok_s": res.get("decode_tok_s"),
                     "peak_rss_gb": res["peak_rss_mb"] * 2**20 / 1e9 if res.get("peak_rss_mb") else None},
        "anchors": [a.model_dump() for a in bench.anchors],
        "targets": {k: t.model_dump() for k, t in bench.targets.items()},
    }
