"""The package's layout rules (docs/architecture.md), checked on the source itself: every
import, function-local ones included, is an edge of the module graph."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "freezeempath_jax"
ROOT = "freezeempath_jax"

# Modules a chat turn runs through: none of them may reach the training package.
INFERENCE_PATH = ("freezeempath_jax.inference", "freezeempath_jax.text",
                  "freezeempath_jax.checkpoints", "freezeempath_jax.models",
                  "freezeempath_jax.audio", "freezeempath_jax.sampling",
                  "freezeempath_jax.tree", "freezeempath_jax.params",
                  "freezeempath_jax.sharding", "freezeempath_jax.distill",
                  "freezeempath_jax.evaluation")


def _modules():
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _edges(modules):
    """{module: set of package modules it imports anywhere in its body}."""
    graph = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for a in node.names:
                    # `from pkg import sub` names the submodule when there is one
                    sub = f"{base}.{a.name}"
                    targets.add(sub if sub in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_graph_is_read():
    graph = _edges(_modules())
    assert "freezeempath_jax.train.trainer" in graph
    assert "freezeempath_jax.train.step" in graph["freezeempath_jax.train.trainer"]
    assert "freezeempath_jax.inference.sampling" in graph["freezeempath_jax.inference.chat"]


def test_no_import_cycles():
    graph = _edges(_modules())
    # A package's __init__ re-exports its submodules: a submodule reaching its own package's
    # __init__ again is a cycle in the graph as Python runs it too.
    cycles = sorted(m for m in graph if m in _reachable(graph, m))
    assert not cycles, f"modules on an import cycle: {cycles}"


@pytest.mark.parametrize("prefix", INFERENCE_PATH)
def test_inference_path_never_imports_training(prefix):
    modules = _modules()
    graph = _edges(modules)
    for name in modules:
        if name == prefix or name.startswith(prefix + "."):
            bad = sorted(m for m in _reachable(graph, name)
                         if m.startswith("freezeempath_jax.train"))
            assert not bad, f"{name} reaches {bad}"
