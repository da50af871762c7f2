"""The package's rooms import one way: each layer only from the layers below it, and the layers
below the data plane never import Ray (so they run and test without a cluster)."""

from __future__ import annotations

import ast
from pathlib import Path

import expertmesh

ROOT = Path(expertmesh.__file__).parent
# lowest first; a module may import its own layer and those before it
LAYERS = [
    {"errors", "model", "store", "jax_backend"},
    {"engine", "mesh_spec"},
    {"dataplane"},
    {"actors"},
    {"platform"},
    {"pipelines", "__init__"},
    {"cli"},
]
NO_RAY = {"errors", "model", "store", "jax_backend", "engine", "mesh_spec"}


def room(module: str) -> str:
    """'expertmesh.engine.step_plan' -> 'engine'; 'expertmesh' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def level(name: str) -> int:
    return next(i for i, rooms in enumerate(LAYERS) if name in rooms)


def imports(path: Path) -> list[tuple[int, str]]:
    """Every import in the file, function-level ones included (they are arrows too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            if node.module == "expertmesh":  # `from expertmesh import cli` names a room
                out += [(node.lineno, f"expertmesh.{a.name}") for a in node.names
                        if (ROOT / a.name).is_dir() or (ROOT / f"{a.name}.py").exists()]
    return out


def modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__") or "expertmesh"
        yield name, path


def test_every_room_imports_only_rooms_below_it():
    wrong = []
    for name, path in modules():
        here = room(name)
        for line, target in imports(path):
            if (target == "expertmesh" or target.startswith("expertmesh.")) and level(room(target)) > level(here):
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line} ({here}) imports {target} "
                             f"({room(target)}, a layer above)")
    assert not wrong, "\n".join(wrong)


def test_rooms_below_the_data_plane_never_import_ray():
    wrong = [f"{path.relative_to(ROOT.parent)}:{line} imports {target}"
             for name, path in modules() if room(name) in NO_RAY
             for line, target in imports(path) if target == "ray" or target.startswith("ray.")]
    assert not wrong, "\n".join(wrong)


def test_no_module_circles():
    """No two modules import each other, directly or through others (function-level imports count)."""
    graph = {name: {t for _, t in imports(path) if t.startswith("expertmesh.") and t != name}
             for name, path in modules()}
    graph = {n: {t if t in graph else t.rsplit(".", 1)[0] for t in ts} & graph.keys() for n, ts in graph.items()}
    cycles, state = [], {}

    def visit(n, stack):
        state[n] = 1
        for t in graph[n]:
            if state.get(t) == 1 and not t == n:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])
    packages = {n for n, p in modules() if p.name == "__init__.py"}
    cycles = [c for c in cycles if not any(c.startswith(p + " ") for p in packages)]
    assert not cycles, "\n".join(cycles)
