"""Project invariants from DESIGN.md that no single feature test covers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(pkg: str) -> set[str]:
    names: set[str] = set()
    for f in (ROOT / pkg).rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_surgery_never_imports_registry():
    assert "registry" not in _imports("surgery")
    # and importing surgery does not pull registry in through a side door
    out = subprocess.run(
        [sys.executable, "-c", "import sys, surgery; print('registry' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "False"


def test_no_pickle_and_no_unsafe_torch_load():
    for pkg in ("surgery", "registry"):
        assert "pickle" not in _imports(pkg), f"{pkg} imports pickle"
        for f in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and getattr(node.func, "attr", None) == "load"
                    and getattr(node.func.value, "id", None) == "torch"
                ):
                    kws = {k.arg: k.value for k in node.keywords}
                    assert isinstance(kws.get("weights_only"), ast.Constant) and kws["weights_only"].value is True, (
                        f"{f}:{node.lineno}: torch.load without weights_only=True"
                    )


def test_peft_is_not_a_runtime_dependency():
    for pkg in ("surgery", "registry"):
        assert "peft" not in _imports(pkg), f"{pkg} imports peft at run time"
