"""The stages import downward only where the layout promises it (README: one place per stage)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "rosenblatt"


def _imports(path: Path) -> set[str]:
    """Modules a file imports, as dotted names relative to the package (``..simd`` -> ``simd``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:      # relative: resolve against the file's package
                parts = list(path.relative_to(PACKAGE).parent.parts)
                parts = parts[:len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join(parts + ([base] if base else []))
            elif base.startswith("rosenblatt"):
                base = base[len("rosenblatt"):].lstrip(".")
            else:
                continue
            names.update(f"{base}.{a.name}".strip(".") for a in node.names)
            names.add(base)
        elif isinstance(node, ast.Import):
            names.update(a.name[len("rosenblatt."):] for a in node.names if a.name.startswith("rosenblatt."))
    return names


#: the stages in data-flow order (docs/architecture.md): a module may import its own stage and
#: those before it, never one after it
STAGES = [
    {"errors", "params"},                   # declarations every stage may use
    {"gguf"},                               # file -> tensors
    {"cpu", "npu"},                         # the hardware's numerics
    {"backends"},                           # matmul seam: cpu | npu
    {"models"},                             # the forward
    {"sampling", "text"},                   # logits -> token -> text
    {"generate", "engine", "scheduler"},    # the loop, the holder, its threads
    {"serve", "bench", "fleet", "cli", "__init__", "__main__"},   # what people run
]
RANK = {name: i for i, stage in enumerate(STAGES) for name in stage}
#: (imported, importer) pairs forbidden inside one stage: the engine holds what the generation
#: loop works on and imports the loop, never the other way round
ORDER_INSIDE = {("engine", "generate"), ("engine", "scheduler"), ("text", "sampling"), ("npu", "cpu"), ("cpu", "npu")}


def _stage(dotted: str) -> str:
    return dotted.split(".")[0] if dotted else "__init__"


def test_every_module_belongs_to_a_stage():
    stages = {_stage(".".join(p.relative_to(PACKAGE).with_suffix("").parts)) for p in PACKAGE.rglob("*.py")}
    assert stages <= set(RANK), sorted(stages - set(RANK))


def test_no_import_runs_upward():
    bad = []
    for p in PACKAGE.rglob("*.py"):
        here = _stage(".".join(p.relative_to(PACKAGE).with_suffix("").parts))
        for name in _imports(p):
            there = _stage(name)
            if there in RANK and (RANK[there] > RANK[here] or (there, here) in ORDER_INSIDE):
                bad.append(f"{p.relative_to(PACKAGE)} imports {name}")
    assert not bad, bad


def test_the_npu_package_has_no_import_cycle():
    """device.py is below gemm.py: the device knows nothing of GEMMs (the circle is gone)."""
    assert not {n for n in _imports(PACKAGE / "npu" / "device.py") if n.startswith("npu.gemm")}


def test_models_do_not_reach_into_the_kernels():
    """The model forward calls the backend (its fused entry points included); the integer
    kernels and their activation formats are the CPU backend's own."""
    allowed = {"cpu", "cpu.ops", "cpu.parallel", "cpu.jit", "cpu.isa", "cpu.qdot"}   # float numerics, threads
    offenders = {p.name: sorted(n for n in _imports(p) if n.startswith("cpu.") and n.split(".")[:2] and
                                ".".join(n.split(".")[:2]) not in allowed)
                 for p in (PACKAGE / "models").glob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}, offenders
    assert "backends.fused" in _imports(PACKAGE / "models" / "llama_step.py")


def test_the_npu_package_knows_nothing_of_transformers():
    for p in (PACKAGE / "npu").glob("*.py"):
        bad = sorted(n for n in _imports(p) if n.split(".")[0] in ("models", "engine", "text", "sampling", "generate"))
        assert not bad, (p.name, bad)
