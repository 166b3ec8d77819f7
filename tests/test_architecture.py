"""The package's import graph: no cycle, and every import goes down the layers.

Read from the source with :mod:`ast` (nothing is imported). An edge ``a -> b`` is an import statement in module
``a`` naming module ``b`` of this project (``from x import y`` names ``x.y`` when that is a module, else ``x``).
Importing a submodule also runs its parent packages' ``__init__``; those are facades, so, as import-linter does,
only the named module counts.

- Module-level imports must not form a cycle: a module that imports only because another import ran first
  breaks when it is imported on its own.
- No import, wherever it stands (a function-level import included), may go up the layers below. A
  function-level import is fine for a slow or optional dependency (torch in the CLI, deepspeed, matplotlib);
  one that dodges a cycle shows up here as an upward edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"sparc_kit": ROOT / "sparc_kit", "sparc_cli": ROOT / "cli"}

#: lowest first; a module may import its own layer and the layers before it
LAYERS = [
    ["sparc_kit.errors"],
    ["sparc_kit.registry", "sparc_kit.io"],
    ["sparc_kit.data", "sparc_kit.checkpoint"],
    ["sparc_kit.models", "sparc_kit.losses"],
    ["sparc_kit.engines", "sparc_kit.evaluate", "sparc_kit.plugins", "sparc_kit.loggers"],
    ["sparc_kit.config"],
    ["sparc_kit.pretrained", "sparc_kit.train", "sparc_kit.export", "sparc_kit.api"],
    ["sparc_kit.ablate"],
    ["sparc_kit.runs"],  # sparc runs: a run folder's summary, ranked as a sweep report ranks
    ["sparc_kit"],  # the package's own __init__: the public facade
    ["sparc_cli"],
]


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imports(name: str, path: Path, module_level: bool) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(nodes, top: bool) -> None:
        for node in nodes:
            if _type_checking(node):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in MODULES)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    here = here[: len(here) - (node.level - 1)]
                    base = ".".join([*here, base] if base else here)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in MODULES:
                        found.add(sub)
                    elif base in MODULES:
                        found.add(base)
            inner_top = top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if module_level and not inner_top:
                continue
            visit(ast.iter_child_nodes(node), inner_top)

    visit(tree.body, True)
    found.discard(name)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that starts and ends at the same module, else None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)):
            return found
    return None


def _layer(module: str) -> int:
    best = None
    for i, members in enumerate(LAYERS):
        for member in members:
            if module == member or (module.startswith(member + ".") and member != "sparc_kit"):
                if best is None or len(member) > best[1]:
                    best = (i, len(member))
    assert best is not None, f"{module} is in no layer of tests/test_architecture.py LAYERS: add it"
    return best[0]


def test_the_graph_reader_sees_known_edges():
    """The reader itself: a plain, a relative and a from-package import, each a known edge of the source."""
    edges = {m: _imports(m, p, module_level=True) for m, p in MODULES.items()}
    assert "sparc_kit.registry" in edges["sparc_kit.losses.sparc"]
    assert "sparc_kit.losses.functional" in edges["sparc_kit.losses.sparc"]
    assert "sparc_kit.data.tokenizer" in edges["sparc_kit.models"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_level_import_cycle():
    graph = {m: _imports(m, p, module_level=True) for m, p in MODULES.items()}
    cycle = _cycle(graph)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_every_import_goes_down_the_layers():
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, path in sorted(MODULES.items())
        for target in sorted(_imports(module, path, module_level=False))
        if _layer(target) > _layer(module)
    ]
    assert upward == []


def test_no_import_cycle_even_through_function_level_imports():
    graph = {m: _imports(m, p, module_level=False) for m, p in MODULES.items()}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_library_imports_its_own_modules_at_module_level():
    """Inside ``sparc_kit`` a function-level import of another of its modules has no reason but a cycle (its
    modules cost nothing once torch is loaded); the CLI may import the library lazily, to start fast."""
    lazy = sorted(
        f"{module} imports {target} inside a function"
        for module, path in MODULES.items()
        if module.startswith("sparc_kit")
        for target in _imports(module, path, module_level=False) - _imports(module, path, module_level=True)
    )
    assert lazy == []


def test_every_package_folder_is_installed():
    """pyproject.toml lists its packages by name: a new package folder left out of that list works in an
    editable install and is missing from a wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert sorted(folders - listed) == []


def test_no_module_imports_the_facade_of_its_own_package():
    """A package's ``__init__`` imports its modules (and, for component packages, every module in the folder); a
    module of the package that imports the package itself depends on how far that ``__init__`` got."""
    inward = sorted(
        f"{module} imports {target}"
        for module, path in MODULES.items()
        for target in _imports(module, path, module_level=False)
        if MODULES[target].name == "__init__.py" and module.startswith(target + ".")
    )
    assert inward == []
