"""The import graph is layered and acyclic: a package (or a room of lightning_modules) imports only
itself and the layers below it, and no module imports one that imports it back. An AST scan of
every import statement, function-local ones included."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Lowest first; a package may import the packages of its own layer's predecessors only.
LAYERS = [
    ("core",),
    ("models", "losses"),
    ("attacks",),
    ("datamodules",),
    ("metrics",),
    ("lightning_modules.methods",),
    ("lightning_modules.config",),
    ("lightning_modules.analysis",),
    ("lightning_modules.run",),
    ("lightning_modules.experiments",),
    ("lightning_modules",),  # the command modules
]
PACKAGES = sorted({p for layer in LAYERS for p in layer}, key=len, reverse=True)


def package_of(module: str) -> str | None:
    return next((p for p in PACKAGES if module == p or module.startswith(p + ".")), None)


def layer_of(package: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if package in layer)


def project_modules() -> dict[str, Path]:
    out = {}
    for top in ("core", "models", "losses", "attacks", "datamodules", "metrics", "lightning_modules"):
        for path in (REPO / top).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_every_import_goes_down_the_layers(graph):
    upward = []
    for module, targets in graph.items():
        source = package_of(module)
        for target in targets:
            if layer_of(package_of(target)) > layer_of(source):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that climb a layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycles(graph):
    # A package's __init__ that imports its own modules (the methods registry) is not a cycle
    # with them: it is how the package lists its contents.
    edges = {m: {t for t in ts if not (m == package_of(t) and t.startswith(m + "."))} for m, ts in graph.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_scan_sees_real_imports(graph):
    # The check above could pass on an empty graph; it must see the edges we know exist.
    assert "lightning_modules.methods.alignment" in graph["lightning_modules.methods.sft"]
    assert "core.errors" in graph["lightning_modules.fit"] or "core.errors" in graph["lightning_modules.run.training"]
