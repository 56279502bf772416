"""Import structure of jsp_fast.training and jsp_fast.app, read from the source (so lazy imports
inside functions count too): no cycles, no import of the package's public face, dependencies
pointing down (app -> training -> cnf)."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).parents[1] / "jsp_fast"
PUBLIC_FACE = {"jsp_fast", "jsp_fast.ops", "jsp_fast.backends"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every jsp_fast module ``path`` imports, resolved (``from . import x`` gives ``pkg.x``)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "jsp_fast"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "jsp_fast":
                continue
            for a in node.names:  # `from pkg import sub` imports the submodule when there is one
                sub = f"{mod}.{a.name}"
                is_sub = (PKG.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                    (PKG.parent / Path(*sub.split("."))).is_dir()
                out.add(sub if is_sub else mod)
    return out


def _graph(*areas: str) -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for area in areas for p in sorted((PKG / area).rglob("*.py"))}


@pytest.mark.parametrize("area", ["training", "app"])
def test_no_import_of_the_public_face(area):
    bad = {m: sorted(deps & PUBLIC_FACE) for m, deps in _graph(area).items() if deps & PUBLIC_FACE}
    assert not bad, f"inner modules importing the package's public face: {bad}"


def test_no_import_cycles():
    graph = _graph("training", "app")
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if d not in graph or d == m:
                continue
            assert state.get(d) != 1, f"import cycle: {' -> '.join(stack + [m, d])}"
            if d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_dependencies_point_down():
    up = {m: sorted(d for d in deps if d.startswith("jsp_fast.app"))
          for m, deps in _graph("training").items()}
    assert not any(up.values()), f"training imports the app: {up}"
    others = [p for p in PKG.rglob("*.py") if not {"app", "training"} & set(p.relative_to(PKG).parts)]
    users = {_module_name(p): sorted(d for d in _imports(p) if d.startswith(("jsp_fast.app", "jsp_fast.training")))
             for p in others if p.name != "__init__.py" or p.parent != PKG}
    assert not any(users.values()), f"lower layers importing training/app: {users}"
