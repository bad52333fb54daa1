"""Turning a key table (source key -> our parameter path) into a parameter tree.

Every loader is a list of `Rule`s plus a `TensorSource`. `assemble` first checks the whole
table against the source's key shapes (no data read), raising one CheckpointError that lists
every missing, unexpected and mis-shaped key; then it builds each output leaf in turn: read
one tensor, convert the layout, cast to the target dtype, write it into the preallocated
stacked `[L, ...]` leaf, and place the finished leaf on its sharding. Host memory therefore
peaks near one stacked leaf plus one tensor on top of what has already been placed.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import jax
import numpy as np

from freezeempath_jax.checkpoints.errors import CheckpointError, Problem
from freezeempath_jax.checkpoints.sources import TensorSource
from freezeempath_jax.tree import unflatten  # noqa: F401  (loaders import it from here)

FLOAT_KINDS = ("float16", "float32", "float64", "bfloat16")


def identity(x):
    return x


@dataclasses.dataclass(frozen=True)
class Rule:
    """One output leaf.

    target: our parameter path, `/`-joined ("llm/layers/attn/q_proj/kernel").
    source: the checkpoint key; with `layers`, a template containing "{i}".
    shape: the expected source shape (per layer).
    fn: source layout -> our layout (transpose, reshape, slice of a fused tensor ...).
    layers: stack `layers` tensors (i = 0..layers-1) along a new leading axis.
    """

    target: str
    source: str
    shape: Tuple[int, ...]
    fn: Callable[[np.ndarray], np.ndarray] = identity
    layers: Optional[int] = None

    def keys(self) -> List[str]:
        if self.layers is None:
            return [self.source]
        return [self.source.format(i=i) for i in range(self.layers)]


def linear(target: str, source: str, out_dim: int, in_dim: int, bias: bool = True,
           layers: Optional[int] = None, out_shape: Optional[Tuple[int, ...]] = None,
           in_shape: Optional[Tuple[int, ...]] = None, sep: str = ".") -> List[Rule]:
    """Rules for a torch Linear `source{sep}{weight,bias}` [out, in] -> `target/{kernel,bias}`.

    kernel = weight.T reshaped to in_shape + out_shape (multi-head projections).
    """
    out_shape = out_shape or (out_dim,)
    in_shape = in_shape or (in_dim,)

    def kernel(w):
        return np.ascontiguousarray(w.T).reshape(in_shape + out_shape)

    rules = [Rule(f"{target}/kernel", f"{source}{sep}weight", (out_dim, in_dim), kernel, layers)]
    if bias:
        rules.append(Rule(f"{target}/bias", f"{source}{sep}bias", (out_dim,),
                          lambda b: b.reshape(out_shape), layers))
    return rules


def prefixed(rules: Sequence[Rule], prefix: str) -> List[Rule]:
    """The same rules with `prefix` put before every target path."""
    return [dataclasses.replace(r, target=prefix + r.target) for r in rules]


class Placer:
    """Decides where each finished leaf goes: a sharding tree, a callable, or host/default.

    shardings: a nested dict mirroring the params (leaves are `jax.sharding.Sharding` or None)
    or a callable `(path, shape) -> Sharding | None`. None leaves the leaf on the default
    device.
    """

    def __init__(self, shardings=None):
        self._fn = None
        self._flat: Dict[str, Any] = {}
        if isinstance(shardings, Placer):
            self._fn = shardings.sharding_for
        elif callable(shardings):
            self._fn = shardings
        elif shardings is not None:
            self._flat = flatten(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))

    def sharding_for(self, path: str, shape):
        """The sharding for leaf `path` (None: default device)."""
        return self._fn(path, shape) if self._fn else self._flat.get(path)

    def sub(self, prefix: str) -> "Placer":
        """A placer for a subtree whose paths lack `prefix` (e.g. "whisper/")."""
        return Placer(lambda path, shape: self.sharding_for(prefix + path, shape))

    def __call__(self, path: str, array: np.ndarray):
        sharding = self.sharding_for(path, array.shape)
        placed = jax.device_put(array) if sharding is None else jax.device_put(array, sharding)
        # device_put is asynchronous and jax keeps `array` (the host staging copy) alive until
        # a later transfer releases it; waiting here frees it before the next leaf is built,
        # so host memory holds one staging leaf at a time, not two or three.
        return placed.block_until_ready()


def flatten(tree, prefix: str = "", is_leaf=None) -> Dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}."""
    out = {}
    if isinstance(tree, dict) or (hasattr(tree, "items") and not (is_leaf and is_leaf(tree))):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}/", is_leaf))
        return out
    out[prefix[:-1]] = tree
    return out


def check(source: TensorSource, rules: Sequence[Rule], *, scope: Callable[[str], bool] = None,
          ignore: Iterable[str] = (), float_only: bool = True) -> List[Problem]:
    """Problems of a key table against a source, without reading data.

    scope: which source keys the table must account for (others are someone else's, e.g. a
    Whisper decoder); keys in scope that no rule reads and no `ignore` regex matches are
    reported as unexpected.
    """
    problems: List[Problem] = []
    used = set()
    for rule in rules:
        for key in rule.keys():
            used.add(key)
            if key not in source:
                problems.append(Problem("missing", key=key, expected=tuple(rule.shape),
                                        file=source.origin, detail=f"for {rule.target}"))
                continue
            shape = source.shape(key)
            if tuple(shape) != tuple(rule.shape):
                problems.append(Problem("shape", key=key, expected=tuple(rule.shape),
                                        actual=tuple(shape), file=source.where(key),
                                        detail=f"for {rule.target}"))
            elif float_only and source.dtype(key) not in FLOAT_KINDS and not _dequantizable(
                    source, key):
                problems.append(Problem("dtype", key=key, file=source.where(key),
                                        expected="a float type", actual=source.dtype(key)))
    ignore_re = [re.compile(p) for p in ignore]
    for key in source.keys():
        if key in used or (scope is not None and not scope(key)):
            continue
        if any(r.fullmatch(key) for r in ignore_re):
            continue
        problems.append(Problem("unexpected", key=key, actual=tuple(source.shape(key)),
                                file=source.where(key)))
    return problems


def _dequantizable(source, key) -> bool:
    return bool(getattr(source, "dequantizes", False))


def _leaf_size(rule: Rule) -> int:
    """Elements of the source tensors behind one output leaf (its size, up to a slice)."""
    return int(np.prod(rule.shape, dtype=np.int64)) * (rule.layers or 1)


def assemble(source: TensorSource, rules: Sequence[Rule], dtype, *, placer: Placer = None,
             scope: Callable[[str], bool] = None, ignore: Iterable[str] = (),
             extra_problems: Sequence[Problem] = (), prefix: str = "") -> Dict[str, Any]:
    """Validates `rules` against `source` (raising one CheckpointError), then loads the leaves.

    Returns a flat {path: array} dict (paths prefixed by `prefix`); arrays are jax arrays
    placed by `placer` in `dtype`.
    """
    problems = list(extra_problems) + check(source, rules, scope=scope, ignore=ignore)
    if problems:
        raise CheckpointError(source.origin, problems)
    placer = placer or Placer()
    dtype = np.dtype(dtype)
    out: Dict[str, Any] = {}
    # Largest leaves first. Placing a leaf briefly needs it twice (the host staging array and
    # the copy jax makes of it), so host memory peaks near max over leaves of (already placed
    # + 2 x this leaf): with the big leaves first that doubling happens while little is placed
    # yet. Measured on CPU (benchmarks/peak_memory_load.py): peak = result + ~0.55 x the
    # largest stacked leaf, against result + 1.0 x in checkpoint order (big MLP leaves last).
    for rule in sorted(rules, key=_leaf_size, reverse=True):
        keys = rule.keys()
        leaf = None
        for i, key in enumerate(keys):
            x = np.asarray(rule.fn(source.read(key))).astype(dtype, copy=False)
            if rule.layers is None:
                leaf = x
                break
            if leaf is None:
                leaf = np.empty((len(keys),) + x.shape, dtype)
            leaf[i] = x
            del x
        path = prefix + rule.target
        out[path] = placer(path, leaf)
        del leaf
    return out
