"""The layout docs/architecture.md describes is the code's: the root holds the entry points and the
model, the worker's parts live in worker/, every module the table names exists (and every module
exists in the table), and no two of the project's modules import each other, directly or in a
circle (imports inside functions count: they are how circles hide)."""

import ast
import os
import re

from tests.helpers import ROOT

PACKAGES = ("worker", "mofasgd", "optimizers", "configs", "data", "scripts")


def project_modules() -> dict[str, str]:
    """Module name -> path of every project .py file outside tests/ and examples/."""
    modules = {}
    for name in os.listdir(ROOT):
        if name.endswith(".py"):
            modules[name[:-3]] = os.path.join(ROOT, name)
    for package in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                    modules[rel.removesuffix(".__init__")] = os.path.join(dirpath, f)
    return modules


def imported_modules(path: str, modules: dict[str, str]) -> set[str]:
    """The project modules a file imports anywhere in it (`from a import b` counts a.b when that is
    a module, else a)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def test_root_holds_only_the_entry_points_and_the_model():
    assert sorted(f for f in os.listdir(ROOT) if f.endswith(".py")) == ["model.py", "run.py", "train_gpt.py"]


def test_no_import_circles():
    modules = project_modules()
    graph = {name: imported_modules(path, modules) - {name} for name, path in modules.items()}
    # A package's __init__ re-exporting its own submodules is not a circle (Python loads it first).
    for name in graph:
        graph[name] = {m for m in graph[name] if not (m == name.rsplit(".", 1)[0] and "." in name)}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert graph["mofasgd.row_sharded"] >= {"mofasgd.factors"} and "mofasgd.optimizer" not in graph["mofasgd.row_sharded"]


def test_architecture_table_names_every_module_and_only_existing_ones():
    text = open(os.path.join(ROOT, "docs", "architecture.md")).read()
    named = set(re.findall(r"`((?:worker/)?[a-z_]+\.py)`", text))
    for path in named:
        candidates = [path] + [os.path.join(d, path) for d in ("mofasgd", "scripts", "optimizers", "data", "configs")]
        assert any(os.path.exists(os.path.join(ROOT, c)) for c in candidates), f"docs/architecture.md names {path}"
    for package in ("worker", "mofasgd"):
        for f in sorted(os.listdir(os.path.join(ROOT, package))):
            if f.endswith(".py") and f != "__init__.py":
                shown = f"{package}/{f}" if package == "worker" else f
                assert shown in named, f"docs/architecture.md does not describe {package}/{f}"
    for f in ("run.py", "train_gpt.py", "model.py"):
        assert f in named
