"""The package's import graph is layered (DESIGN.md, "Layers"): no import circle, and no module imports one of a
higher layer. Read from the source with `ast` (imports inside functions count too); a synthetic upward import and a
synthetic circle are caught (negative controls)."""

import ast
from pathlib import Path

import pytest

import jinbetween

PACKAGE = Path(jinbetween.__file__).parent

# Bottom to top. A module may import modules of its own layer or of a lower one. The storage layer sits above the
# models (it loads them; they never know where their weights come from), beside the denoiser, which uses neither it
# nor anything above.
LAYERS = (
    ("base", ("jinbetween.errors", "jinbetween.logs", "jinbetween.hardware", "jinbetween.atomic", "jinbetween.checks",
              "jinbetween.config", "jinbetween.integrity", "jinbetween.checkpoint", "jinbetween.schedule",
              "jinbetween.video", "jinbetween.conditioning", "jinbetween.flops", "jinbetween.compile_cache",
              "jinbetween.distributed", "jinbetween.data", "jinbetween.sequence")),
    ("models", ("jinbetween.models",)),
    ("storage", ("jinbetween.weights",)),
    ("denoiser", ("jinbetween.denoiser",)),
    ("samplers", ("jinbetween.samplers",)),
    ("application", ("jinbetween.pipeline", "jinbetween.finetune")),
    ("apps", ("jinbetween.cli", "jinbetween.toyworld", "jinbetween")),
)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_sources(root: Path = PACKAGE) -> dict[str, str]:
    """Returns {module name: source} of every module of the package."""
    return {module_name(path, root): path.read_text() for path in sorted(root.rglob("*.py"))}


def imported_modules(source: str, modules: set[str]) -> set[str]:
    """Returns the package modules that `source` imports (`from a import b` is module a.b when that is one)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                      for alias in node.names}
    return found & modules


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    modules = set(sources)
    return {name: imported_modules(source, modules) - {name} for name, source in sources.items()}


def layer_of(module: str) -> int:
    """Returns the index in LAYERS of the layer whose longest prefix names `module`."""
    matches = [(len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer: add it to LAYERS"
    return max(matches)[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
                  for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Returns the strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    return package_sources()


def test_every_module_has_a_layer(sources):
    for module in sources:
        layer_of(module)


def test_no_import_circle(sources):
    assert circles(import_graph(sources)) == [], "import circles"


def test_no_import_from_a_lower_layer_up(sources):
    assert upward_imports(import_graph(sources)) == [], "upward imports"


def test_the_models_never_import_the_storage_layer(sources):
    graph = import_graph(sources)
    reached = {b for a, targets in graph.items() if a.startswith("jinbetween.models") for b in targets}
    assert not any(b.startswith("jinbetween.weights") for b in reached)


def test_a_synthetic_upward_import_and_circle_are_caught(sources):
    """Negative controls: the checks above find an upward import and a circle put into a copy of the sources."""
    upward = dict(sources)
    upward["jinbetween.models.unet"] += "\n\ndef load():\n    from jinbetween.weights import loading\n"
    assert upward_imports(import_graph(upward)) == [
        "jinbetween.models.unet (models) imports jinbetween.weights.loading (storage)"]
    circular = dict(sources)
    circular["jinbetween.atomic"] += "\nfrom jinbetween import integrity\n"
    assert circles(import_graph(circular)) == [["jinbetween.atomic", "jinbetween.integrity"]]
