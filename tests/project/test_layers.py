"""The package's architecture as a test: subpackages form layers that import downwards only, and no module imports
another that (through any chain, function-level and type-checking imports included) imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "st_daft"

#: each top-level module or subpackage of st_daft, lowest layer first; a module may import its own package and any
#: package of a lower layer
LAYERS = (
    ("utils", "citations"),
    ("data",),
    ("models",),
    ("embeddings",),
    ("negatives",),
    ("evaluation",),
    ("label_free",),
    ("losses",),
    ("callbacks",),
    ("training",),
    ("serving",),
    ("cli",),
)
LAYER_OF = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(path: Path, name: str) -> set[str]:
    """Every st_daft module ``path`` imports, wherever the import statement stands."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("st_daft"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module.startswith("st_daft"):
                found.add(module)
                # "from package import submodule" imports the submodule
                found.update(f"{module}.{alias.name}" for alias in node.names)
    modules = _modules()
    return {module for module in found if module in modules and module != name}


def _layer(module: str) -> tuple[int, str] | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # st_daft itself: its lazy map imports by name, at first use
    part = parts[1]
    if part not in LAYER_OF:
        raise AssertionError(f"{module}: st_daft.{part} has no layer in tests/project/test_layers.py LAYERS")
    return LAYER_OF[part], part


def _graph() -> dict[str, set[str]]:
    return {name: _imports(path, name) for name, path in _modules().items()}


def test_every_module_has_a_layer() -> None:
    for name in _modules():
        _layer(name)


def test_layers_import_downwards_only() -> None:
    upward = []
    for importer, imported in _graph().items():
        own = _layer(importer)
        for module in imported:
            target = _layer(module)
            if own is None or target is None:
                continue
            if target[0] > own[0] or (target[0] == own[0] and target[1] != own[1] and own[0] != 0):
                upward.append(f"{importer} -> {module}")
    assert not upward, "imports that go up or sideways:\n" + "\n".join(sorted(upward))


def import_circles(graph: dict[str, set[str]]) -> list[str]:
    """Every circle of ``graph`` (module -> modules it imports) a depth-first search meets, as ``a -> b -> a``."""
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            # importing a module runs its package's __init__ first: an edge to one's own package is no circle
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                circles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return circles


def test_no_import_circle() -> None:
    circles = import_circles(_graph())
    assert not circles, "import circles:\n" + "\n".join(circles)


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_opens_with_what_it_holds(name: str) -> None:
    path = _modules()[name]
    tree = ast.parse(path.read_text())
    docstring = ast.get_docstring(tree)
    assert docstring and len(docstring.split()) >= 8, f"{path.relative_to(PACKAGE.parent)} opens with no docstring"
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)}: {lines} lines (at most {MAX_LINES})"


def test_the_checks_see_what_they_must() -> None:
    """The checks themselves: a circle through function-level imports is found, an edge to one's own package is no
    circle, function-level imports are read, and the CLI sits above the models."""
    graph = {"st_daft.a": {"st_daft.b"}, "st_daft.b": {"st_daft.a"}, "st_daft.c": {"st_daft.a"}}
    assert import_circles(graph) == ["st_daft.a -> st_daft.b -> st_daft.a"]
    assert import_circles({"st_daft.x.y": {"st_daft.x"}, "st_daft.x": {"st_daft.x.y"}}) == []
    # st_daft.cli.train imports the recipe inside its functions (so that `st-daft --help` loads no torch)
    assert "st_daft.training.recipe" in _imports(PACKAGE / "cli" / "train.py", "st_daft.cli.train")
    assert _layer("st_daft.cli.train")[0] > _layer("st_daft.models.asymmetric")[0]


TESTS = Path(__file__).resolve().parents[1]
#: test folders that test the project as a whole rather than one subpackage
PROJECT_TEST_FOLDERS = {"project"}


def test_tests_mirror_the_package() -> None:
    subpackages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    folders = {path.name for path in TESTS.iterdir() if path.is_dir() and path.name != "__pycache__"}
    assert folders - PROJECT_TEST_FOLDERS <= subpackages, f"test folders without a subpackage: {folders - subpackages}"
    loose = sorted(
        path.name
        for path in TESTS.glob("test_*.py")
        if path.stem.removeprefix("test_") not in {p.stem for p in PACKAGE.glob("*.py")}
    )
    assert not loose, f"tests of a subpackage belong in its folder: {loose}"
    for path in TESTS.rglob("test_*.py"):
        assert len(path.read_text().splitlines()) <= 800, f"{path.relative_to(TESTS)}: split it by the unit it tests"
