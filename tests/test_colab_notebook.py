"""The Colab notebook stays a thin client of the library: valid JSON, every code cell compiles
(shell `!` lines aside), and every library attribute it calls exists."""

import ast
import importlib
import json
import os

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "colab", "freezeempath_jax_demo.ipynb")


def _code_cells():
    with open(NOTEBOOK) as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            src = "".join(cell["source"])
            yield "\n".join(l for l in src.splitlines() if not l.lstrip().startswith("!"))


def test_cells_compile_and_call_existing_library_names():
    imported, called = {}, set()
    for src in _code_cells():
        tree = ast.parse(src)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("freezeempath_jax"):
                for a in node.names:
                    imported[a.asname or a.name] = f"{node.module}.{a.name}"
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in imported):
                called.add((node.value.id, node.attr))
        # no function or class definitions: logic lives in the library
        assert not any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in ast.walk(tree))
    assert {"demo", "chat", "checkpoints"} <= set(imported)
    for name, attr in called:
        module = importlib.import_module(imported[name])
        assert hasattr(module, attr), f"notebook calls {imported[name]}.{attr}, which is missing"
    assert ("demo", "run_demo") in called and ("checkpoints", "convert") in called
