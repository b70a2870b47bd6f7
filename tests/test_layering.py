"""The stages import downward only where the layout promises it (README: one place per stage)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rosenblatt"


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


def test_models_do_not_reach_into_the_kernels():
    """The model forward calls the backend (its fused entry points included); the integer
    kernels and their activation formats are the CPU backend's own."""
    offenders = {p.name: sorted(n for n in _imports(p) if n == "simd" or n.startswith("simd."))
                 for p in (PACKAGE / "models").glob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}, offenders
    assert "backends.fused" in _imports(PACKAGE / "models" / "llama_step.py")


def test_the_npu_package_knows_nothing_of_transformers():
    for p in (PACKAGE / "npu").glob("*.py"):
        bad = sorted(n for n in _imports(p) if n.split(".")[0] in ("models", "engine", "tokenizer", "chat_template"))
        assert not bad, (p.name, bad)
