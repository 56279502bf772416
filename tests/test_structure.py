"""The package's layering, checked from the source (every import, module-level or inside a function).

- No import cycles between the package's modules.
- A private module (any path component with a leading underscore) never imports the package's public
  face (``jsp_fast/__init__.py``, ``jsp_fast.ops``, ``jsp_fast.backends``): the face re-exports the
  internals, so the reverse edge is a loop in waiting.
- Dependencies point down: app -> training / prune / sparse -> cnf -> the compiled core and kernels.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__import__("jsp_fast").__file__).resolve().parent
FACE = {"jsp_fast", "jsp_fast.ops", "jsp_fast.backends"}
# What each area may import (besides itself and the base modules). Base modules import nothing of ours
# but each other.
BASE = {"jsp_fast._C", "jsp_fast._act", "jsp_fast._blocks", "jsp_fast._device", "jsp_fast._ext", "jsp_fast._io",
        "jsp_fast._linear_mask", "jsp_fast._timing", "jsp_fast._version", "jsp_fast.errors"}
ALLOWED = {
    "app": {"training", "prune", "sparse", "cnf", "data", "kernels"},
    "training": {"prune", "sparse", "cnf", "data"},
    "prune": {"cnf"},
    "sparse": {"cnf", "kernels"},
    "cnf": set(),
    "data": set(),
    "kernels": set(),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    out["jsp_fast._C"] = None  # the compiled core: imports nothing of ours
    return out


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph = {}
    for mod, path in mods.items():
        if path is None:
            graph[mod] = set()
            continue
        is_pkg = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node)
                # `from pkg import sub` imports pkg.sub; `from pkg import name` imports pkg itself
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for name in names:
                # the longest known module that the name starts with
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != mod and name.startswith("jsp_fast"):
                    targets.add(name)
        graph[mod] = targets
    return graph


MODS = _modules()
GRAPH = _imports(MODS)


def _area(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def _private(mod: str) -> bool:
    return any(p.startswith("_") for p in mod.split(".")[1:])


def test_no_import_cycles():
    def is_ancestor(a: str, b: str) -> bool:  # a package's __init__ importing its own children is fine
        return b.startswith(a + ".")

    color, stack, cycles = {}, [], []

    def visit(m):
        color[m] = 1
        stack.append(m)
        for n in sorted(GRAPH.get(m, ())):
            if is_ancestor(m, n) or is_ancestor(n, m):
                continue
            if color.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in color:
                visit(n)
        stack.pop()
        color[m] = 2

    for m in sorted(GRAPH):
        if m not in color:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_private_modules_do_not_import_the_public_face():
    bad = [(m, t) for m, ts in GRAPH.items() if _private(m) for t in ts if t in FACE]
    assert not bad, f"private modules importing the public face: {bad}"


def test_dependencies_point_down():
    bad = []
    for m, ts in GRAPH.items():
        if m in FACE:
            continue
        src = _area(m)
        for t in ts:
            if t in BASE or t in FACE and src is None:
                continue
            dst = _area(t)
            if m in BASE and t not in BASE:
                bad.append((m, t))
            elif src is not None and dst is not None and dst != src and dst not in ALLOWED[src]:
                bad.append((m, t))
    assert not bad, f"imports against the layering: {bad}"


@pytest.mark.parametrize("mod", sorted(m for m in MODS if not _private(m) and MODS[m] is not None))
def test_public_modules_declare_all(mod):
    tree = ast.parse(MODS[mod].read_text())
    names = {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
             for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    assert "__all__" in names, f"{mod} has no __all__"


def test_compute_layer_takes_activations_from_the_base_module():
    """sparse/ and kernels/ get activation names, codes and derivatives from jsp_fast._act, never
    through cnf (which re-exports them for its own users)."""
    bad = []
    for mod, path in MODS.items():
        if path is None or _area(mod) not in ("sparse", "kernels"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("cnf._layers"):
                names = {a.name for a in node.names}
                bad += [(mod, n) for n in names & {"activate", "activation_derivative", "check_activation",
                                                   "ACTIVATIONS"}]
    assert not bad, bad
