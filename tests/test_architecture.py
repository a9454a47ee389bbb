"""The shape of the code: defaults in one place, no import cycles, no private names across modules,
method branches only in the method registry, modules and functions of readable size."""

import ast
from pathlib import Path

import yaml

from dseh.config import Config, to_dict
from tests.helpers import REPO

PKG = REPO / "dseh"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(REPO).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = ast.parse(f.read_text(), str(f))
    return out


def _runtime_imports(tree: ast.Module, name: str, known: set[str]) -> set[str]:
    """dseh modules imported by a module at run time (module level or inside functions), leaving out
    `if TYPE_CHECKING:` blocks."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m != name and not name.startswith(m + ".")}


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def test_dataclass_defaults_equal_params_yaml():
    params = _leaves(yaml.safe_load((REPO / "params.yaml").read_text()))
    defaults = _leaves(to_dict(Config()))
    diff = {
        k: (defaults.get(k), params.get(k)) for k in params.keys() | defaults.keys() if defaults.get(k) != params.get(k)
    }
    assert not diff, f"(dseh/config.py default, params.yaml value) differ: {diff}"


def test_import_graph_has_no_cycle():
    mods = _modules()
    graph = {name: _runtime_imports(tree, name, set(mods)) for name, tree in mods.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_no_private_names_across_modules():
    bad = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dseh"):
                bad += [
                    f"{name}: from {node.module} import {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not bad


def test_method_branches_live_in_the_registry():
    """No `cfg.method == ...` or `in (...)` outside dseh/methods.py: ask the registry entry instead."""
    bad = []
    for f in PKG.rglob("*.py"):
        if f.name == "methods.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Compare) and any(
                isinstance(x, ast.Attribute) and x.attr == "method" for x in [node.left, *node.comparators]
            ):
                bad.append(f"{f.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad


def test_modules_and_functions_stay_small():
    long_modules = {
        str(f.relative_to(REPO)): n for f in PKG.rglob("*.py") if (n := len(f.read_text().splitlines())) > 460
    }
    assert not long_modules
    long_functions = []
    for f in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 85:
                long_functions.append(f"{f.relative_to(REPO)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long_functions


def test_docstrings_point_into_this_repository():
    for f in [*PKG.rglob("*.py"), REPO / "params.yaml"]:
        assert "shared/spec" not in f.read_text(), f
    assert (REPO / "docs" / "architecture.md").is_file()


def test_every_module_says_what_it_holds():
    missing = [str(Path(n)) for n, tree in _modules().items() if not ast.get_docstring(tree) and n != "dseh"]
    assert not missing
