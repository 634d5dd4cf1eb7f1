"""The import structure of the library: no cycles between modules, no module using another's
private names, and the model layer (graph, selectors, compose, context) never imports the engine.
Function-level imports count like top-level ones: a cycle hidden in a function is still a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("surgery", "registry")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _scan() -> tuple[dict[str, set[str]], list[str]]:
    """module -> the internal modules it imports; and every use of another module's private name."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private: list[str] = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"
        aliases: dict[str, str] = {}  # local name -> internal module
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in mods:
                        edges[mod].add(a.name)
                        aliases[a.asname or a.name] = a.name
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    up = up[: len(up) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in mods:  # `from surgery import engine`
                        edges[mod].add(sub)
                        aliases[a.asname or a.name] = sub
                    elif base in mods:
                        edges[mod].add(base)
                        if a.name.startswith("_") and not a.name.startswith("__"):
                            private.append(f"{path.name}:{node.lineno} imports {a.name} from {base}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                target = aliases.get(node.value.id)
                if target and target != mod and node.attr.startswith("_") and not node.attr.startswith("__"):
                    private.append(f"{path.name}:{node.lineno} reaches {target}.{node.attr}")
    for m in edges:
        edges[m].discard(m)
        # a package's __init__ re-exports its modules: importing a package is not a dependency cycle
        edges[m] = {e for e in edges[m] if not m.startswith(e + ".")}
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_scan()[0]) == []


def test_no_private_names_across_modules():
    assert _scan()[1] == []


@pytest.mark.parametrize("mod", ["surgery.graph", "surgery.selectors", "surgery.compose", "surgery.context"])
def test_the_model_layer_does_not_import_the_engine(mod):
    edges, _ = _scan()
    seen, todo = set(), [mod]
    while todo:  # what it imports, directly or through others
        m = todo.pop()
        for n in edges.get(m, ()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    assert "surgery.engine" not in seen, f"{mod} reaches surgery.engine through {sorted(seen)}"
    assert "registry" not in {s.split(".")[0] for s in seen}


def test_the_scan_sees_a_cycle_and_a_private_name():
    """The checks above can fail: a made-up cycle and a private import are found."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    edges, _ = _scan()
    assert "surgery.engine" in edges["surgery.methods.fusion"] or "surgery.engine" in edges["surgery"]
