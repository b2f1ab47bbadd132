"""The code's shape, checked: one place for private TF APIs, no reaching into another
module's private names, no import cycles, no measurements or outside references in
comments, and the public docstrings' examples run."""
import ast
import doctest
import importlib
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "fused_segloss")


def _modules():
    """{dotted module name: parsed AST} of every module in the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                dotted = dotted[:-len(".__init__")] if dotted.endswith(".__init__") else dotted
                with open(path, encoding="utf-8") as f:
                    found[dotted] = ast.parse(f.read(), path)
    return found


MODULES = _modules()


def _resolve(module, node):
    """The absolute module a `from ... import` names."""
    if not node.level:
        return node.module or ""
    is_package = any(m.startswith(module + ".") for m in MODULES)
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _top_level_imports(module, tree):
    """(imported module, names) of the imports that run when the module is imported."""
    for node in tree.body:
        if isinstance(node, ast.Try):
            nodes = node.body
        else:
            nodes = [node]
        for inner in nodes:
            if isinstance(inner, ast.ImportFrom):
                yield _resolve(module, inner), [a.name for a in inner.names]
            elif isinstance(inner, ast.Import):
                for alias in inner.names:
                    yield alias.name, []


def test_private_tensorflow_apis_only_in_xla_module():
    pattern = re.compile(r"tensorflow\.(python|compiler|core)\b|\btf\._(?!_)|\._numpy\(")
    offenders = []
    for module, tree in MODULES.items():
        if module == "fused_segloss._xla":
            continue
        source = ast.unparse(tree)
        if pattern.search(source):
            offenders.append(module)
    assert not offenders, f"private TensorFlow APIs outside _xla.py: {offenders}"


def test_no_module_uses_another_modules_private_names():
    offenders = []
    for module, tree in MODULES.items():
        imported = {}  # local name -> package module it refers to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _resolve(module, node)
                for alias in node.names:
                    target = f"{source}.{alias.name}"
                    if target in MODULES:  # a module: using it is fine, `_x` or not
                        imported[alias.asname or alias.name] = target
                    elif alias.name.startswith("_") and alias.name != "__version__":
                        offenders.append(f"{module}: from {source} import {alias.name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in imported and node.attr.startswith("_")):
                offenders.append(f"{module}: {node.value.id}.{node.attr}")
    assert not offenders, offenders


def test_no_import_cycles():
    graph = {m: set() for m in MODULES}
    for module, tree in MODULES.items():
        for target, names in _top_level_imports(module, tree):
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in MODULES and candidate != module:
                    graph[module].add(candidate)
                    break
    # A package's __init__ runs before its submodules: an edge back to the package
    # from its own submodule is the normal order, not a cycle.
    for module in graph:
        graph[module] = {t for t in graph[module] if not module.startswith(t + ".")}
    state = {}

    def visit(node, path):
        state[node] = "active"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "active":
                raise AssertionError("import cycle: " + " -> ".join(path + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_comments_state_mechanisms_not_measurements():
    """No timings, host names, commit hashes or documents outside the repository in code."""
    pattern = r"Zen ?[0-9]|Ice Lake|[0-9.]+ ?ms\b|[0-9]+% (faster|slower)|DESIGN|commit [0-9a-f]{7}"
    found = subprocess.run(["git", "grep", "-nE", pattern, "--", "csrc", "fused_segloss",
                            "CMakeLists.txt", "setup.py"],
                           cwd=ROOT, capture_output=True, text=True)
    if found.returncode not in (0, 1):
        pytest.skip(f"git grep unavailable: {found.stderr.strip()}")
    assert found.stdout == "", found.stdout


@pytest.mark.parametrize("name", ["fused_segloss", "fused_segloss.ops", "fused_segloss.combine",
                                  "fused_segloss.keras.loss", "fused_segloss.keras.metrics"])
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name),
                             optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, result
