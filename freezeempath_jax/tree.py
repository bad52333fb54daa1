"""Parameter-tree utilities shared by every package: paths, flatten / unflatten, merging and
dtype casts.

Trees are the nested dicts Flax produces. A path is the `/`-joined chain of keys to a leaf
(`llm/layers/attn/q_proj/kernel`); boxed leaves (`nn.LogicallyPartitioned`) count as leaves, so
boxed and unboxed trees have the same paths.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from freezeempath_jax.models.configs import to_dtype


def _is_boxed(x) -> bool:
    return isinstance(x, meta.AxisMetadata)


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path) -> str:
    """`/`-joined form of a jax key path (DictKey, GetAttrKey, SequenceKey entries) or of a
    tuple of plain keys."""
    return "/".join(_key_str(k) for k in path)


def flatten_with_paths(tree, is_leaf: Optional[Callable[[Any], bool]] = None
                       ) -> Dict[str, Any]:
    """{path: leaf} in tree order. Boxed (`nn.LogicallyPartitioned`) leaves count as leaves, so
    boxed and unboxed trees give the same paths."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf or _is_boxed)
    return {path_str(path): leaf for path, leaf in flat}


def unflatten(flat: Mapping[str, Any]) -> dict:
    """Inverse of `flatten_with_paths` for nested-dict trees: {path: leaf} -> nested dict."""
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        keys = path.split("/")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"path {path!r} runs through a leaf at {k!r}")
        node[keys[-1]] = leaf
    return out


def merge_into(base, update, *, strict: bool = False, is_leaf=None) -> dict:
    """`base` with every leaf of `update` put in (e.g. loaded or trained parts over an
    initialised tree).

    strict: every path of `update` must exist in `base` with the same shape, and the leaf
    keeps `base`'s dtype; otherwise a ValueError names the unknown or mis-shaped paths.
    Without it, new paths are added as they are.
    """
    flat = flatten_with_paths(base, is_leaf)
    new = flatten_with_paths(update, is_leaf)
    if strict:
        unknown = sorted(set(new) - set(flat))
        if unknown:
            raise ValueError(f"loaded parameters the model does not have: {unknown[:8]}")
        for k, v in new.items():
            if tuple(np.shape(v)) != tuple(np.shape(flat[k])):
                raise ValueError(f"parameter {k}: loaded shape {np.shape(v)}, model shape "
                                 f"{np.shape(flat[k])}")
            flat[k] = jnp.asarray(v, jnp.result_type(flat[k]))
    else:
        flat.update(new)
    return unflatten(flat)


def cast_floating(tree, dtype):
    """Casts floating-point leaves to `dtype` (integer leaves untouched)."""
    dtype = to_dtype(dtype)

    def one(x):
        if jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return x.astype(dtype) if hasattr(x, "astype") else jnp.asarray(x, dtype)
        return x

    return jax.tree.map(one, tree)


def cast_floating_abstract(tree, dtype):
    """`cast_floating` for `jax.ShapeDtypeStruct` trees (keeps shardings)."""
    dtype = to_dtype(dtype)

    def one(x):
        if jnp.issubdtype(x.dtype, jnp.floating):
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=getattr(x, "sharding", None))
        return x

    return jax.tree.map(one, tree)


def param_count(tree) -> int:
    """Number of scalars in a (possibly abstract) tree."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
