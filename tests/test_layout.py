"""The package's floors (docs/layout.md), read from the source: imports run downward only."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ordmoe_megatron"
# Package imports inside functions, each for a reason the module says: entry points filter
# Megatron's import warnings first; Megatron-LM core_v0.19's model configuration exists there only.
INNER_IMPORTS_ALLOWED = {
    ("ordmoe_megatron.megatron_lm", "ordmoe_megatron.megatron_lm.model_config"),
}
FLOORS = {
    "errors": -1,
    "method": 0,
    "runtime": 1,
    "data": 1,
    "mcore": 2,
    "flags": 2,
    "train": 3,
    "megatron_lm": 3,
    "convert": 3,
    "report": 3,
    "sweep": 4,
    "entrypoints": 5,
}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def _package_imports(name, path):
    """(imported module, inside a function?) for every ordmoe_megatron import of a module."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    nested = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
        if n is not f
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            if target.startswith("ordmoe_megatron"):
                yield target, id(node) in nested


def _floor(module):
    if module.endswith(".__main__"):
        return FLOORS["entrypoints"] + 1  # `python -m ...` runs an entry point
    parts = module.split(".")
    return FLOORS.get(parts[1]) if len(parts) > 1 else 0


def _known(module, names):
    while module and module not in names:
        module = module.rpartition(".")[0]
    return module


def _graph():
    modules = dict(_modules())
    graph = {}
    for name, path in modules.items():
        graph[name] = {(_known(t, modules), inner) for t, inner in _package_imports(name, path)}
    return graph


def test_nothing_in_the_package_imports_from_tests():
    """Test helpers live in tests/ (tests/support.py); production code never imports them."""
    offenders = []
    for name, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            offenders += [f"{name} -> {t}" for t in targets if t == "tests" or t.startswith("tests.")]
    assert not offenders, offenders


def test_each_floor_imports_only_the_floors_below_it():
    bad = []
    for module, edges in _graph().items():
        if module == "ordmoe_megatron":
            continue
        here = _floor(module)
        assert here is not None, f"{module} is on no floor: add it to FLOORS and docs/layout.md"
        for target, _ in edges:
            same_package = target.split(".")[:2] == module.split(".")[:2]
            if not same_package and target != "ordmoe_megatron" and _floor(target) >= here:
                bad.append(f"{module} -> {target}")
    assert not bad, bad


def test_package_imports_sit_at_the_top_of_files():
    inner = [
        f"{m} -> {t}"
        for m, edges in _graph().items()
        for t, nested in edges
        if nested and m != "ordmoe_megatron.entrypoints" and (m, t) not in INNER_IMPORTS_ALLOWED
    ]
    assert not inner, inner


def test_there_is_no_import_circle():
    graph = {m: {t for t, _ in edges if t != m} for m, edges in _graph().items()}
    # A package's __init__ importing its own submodules is not a circle.
    for m in graph:
        graph[m] = {
            t for t in graph[m] if not (t.startswith(m + ".") and (PACKAGE.parent / Path(*m.split("."))).is_dir())
        }
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_tests_share_helpers_only_through_tests_support():
    """A test file imports what tests share from tests/support.py, never from another test file."""
    offenders = []
    for path in sorted((PACKAGE.parent / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1].startswith("test_"):
                offenders.append(f"{path.relative_to(PACKAGE.parent)} -> {node.module}")
    assert not offenders, offenders


def test_every_owner_in_the_layout_table_is_in_the_code():
    """docs/layout.md's 'one owner for each rule' names modules, functions, classes and their
    members that exist: a bare name in a cell is looked up in (or beside) the cell's first owner."""
    import importlib
    import inspect
    import re
    import types

    from ordmoe_megatron import OrdMoEConfig
    from ordmoe_megatron.mcore.model import OrdMoEGPTModel
    from ordmoe_megatron.mcore.router import TierRouter

    classes = {c.__name__: c for c in (OrdMoEConfig, OrdMoEGPTModel, TierRouter)}

    def resolve(name, context):
        head, *rest = name.split(".")
        if head in classes:
            obj = classes[head]
        else:
            obj = None
            for cut in range(len(name.split(".")), 0, -1):
                try:
                    obj = importlib.import_module("ordmoe_megatron." + ".".join(name.split(".")[:cut]))
                except ImportError:
                    continue
                rest = name.split(".")[cut:]
                break
            if obj is None:
                assert context is not None, f"{name}: no such module, class or name"
                obj, rest = context, [name]
        parent = None
        for part in rest:
            if not hasattr(obj, part) and hasattr(obj, "__path__"):
                importlib.import_module(f"{obj.__name__}.{part}")
            if isinstance(obj, type) and not hasattr(obj, part):  # an attribute of its instances
                assert f"self.{part}" in inspect.getsource(obj), f"{name}: {obj!r} has no {part}"
                return obj
            assert hasattr(obj, part), f"{name}: {obj!r} has no {part}"
            parent, obj = obj, getattr(obj, part)
        # a bare name after this one is looked up here: in a module or class, or beside a member
        return obj if isinstance(obj, (type, types.ModuleType)) or parent is None else parent

    text = (PACKAGE.parent / "docs" / "layout.md").read_text().split("## One owner for each rule")[1]
    rows = [line.split("|")[2] for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) > 25
    for owner in rows[1:]:  # the header row is "owner"
        context = None
        for name in re.findall(r"`([A-Za-z_][\w.]*)`", owner):
            found = resolve(name, context)
            context = context if context is not None else found
