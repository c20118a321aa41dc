"""The house's layers (docs/architecture.md): imports run one way, downward, with no circle,
lazy imports (inside functions) included. Read from the source with ast, so an import that
runs only on some path counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# From the bottom up; a module may import its own layer and those before it in this list.
LAYERS = [
    ("foundation", ["aegis.version", "aegis.platforms", "aegis.layout", "aegis.files",
                    "aegis.pids", "aegis.credential"]),
    ("pure", ["aegis.config", "aegis.plan", "aegis.render", "aegis.model_source"]),
    ("login side", ["aegis.scheduler", "aegis.runfiles", "aegis.run", "aegis.weights",
                    "aegis.remote"]),
    ("in the job", ["aegis.launch", "aegis.bcast", "aegis._bcast"]),
    ("using a run", ["aegis.clients"]),
    ("entry points", ["aegis.cli", "aegis.__main__", "aegis.launch.__main__", "aegis"]),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "aegis").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _layer(module: str) -> int:
    best, index = "", None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, index = prefix, i
    assert index is not None, f"{module} is in no layer: add it to LAYERS (and the docs)"
    return index


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every aegis module `module` imports, at the top or inside a function."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            for alias in node.names:
                full = f"{name}.{alias.name}"
                found.add(full if full in modules or full == "aegis._bcast" else name)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.startswith("aegis") and m != module
            and (m in modules or m == "aegis._bcast")}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    for module in list(graph):
        # importing a.b.c runs a.b's __init__ first: an edge to every enclosing subpackage
        # (the root package's face is the entry point, not part of the layers' circle check)
        parts = module.split(".")
        for i in range(2, len(parts)):
            parent = ".".join(parts[:i])
            if parent in graph and parent != module:
                graph[module].add(parent)
    for package in graph:  # a package's face importing its own modules is not a circle
        if modules[package].name == "__init__.py":
            graph[package] = {m for m in graph[package] if not m.startswith(package + ".")}
    return graph


def test_every_import_points_down_the_layers():
    wrong = []
    for module, imported in sorted(_graph().items()):
        for other in sorted(imported):
            if other != "aegis._bcast" and _layer(other) > _layer(module):
                wrong.append(f"{module} ({LAYERS[_layer(module)][0]}) imports {other} "
                             f"({LAYERS[_layer(other)][0]})")
    assert wrong == []


def test_no_import_circle_not_even_a_lazy_one():
    graph = _graph()
    graph.pop("aegis", None)  # `import aegis` exposes Run and submit: the package's face
    for imported in graph.values():
        imported.discard("aegis")
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(v: str) -> None:  # Tarjan: strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert circles == []


def test_the_launch_package_face_is_small():
    face = (SRC / "aegis" / "launch" / "__init__.py").read_text()
    code = [line for line in face.splitlines()
            if line.strip() and not line.startswith((" ", '"', "Public", "Where"))]
    assert len(face.splitlines()) < 50 and all(
        line.startswith(("from .", "__all__", "  ", '"""')) or line[0].isspace() or
        line.startswith(tuple("abcdefghijklmnopqrstuvwxyz")) for line in code)
    assert "def " not in face and "class " not in face
