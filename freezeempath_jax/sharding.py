"""Device mesh and logical-axis sharding.

Layers only name their axes (logical names below); which mesh axis each name maps to is data
(`rules`, from config). Nothing inside a layer knows the mesh.

Parameter axis names:
  LLM / speech decoder: "vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers"
  Whisper encoder:      "audio_embed", "audio_mlp", "audio_heads", "head_dim", "mel", "conv_k",
                        "positions", "layers"
  adapters / emotion:   "adapter_in", "adapter_hidden", "embed", "audio_embed", "gate_hidden",
                        "queries", "classes", "conv_k"
  norms:                "norm" (replicated)
Activation axis names:
  "activation_batch", "activation_length", "activation_embed", "activation_heads",
  "activation_kv_heads", "activation_mlp", "activation_vocab", "activation_layers"
"""

from __future__ import annotations

from typing import Sequence, Tuple

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES: Tuple[str, ...] = ("data", "fsdp", "tensor")

# Default logical -> mesh rules: batch over data x fsdp, weights' model dim over fsdp (ZeRO-3
# style), wide dims (heads, MLP, vocab) over tensor. Unlisted names are replicated.
DEFAULT_RULES: Tuple[Tuple[str, object], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("audio_embed", "fsdp"),
    ("mlp", "tensor"),
    ("audio_mlp", "tensor"),
    ("heads", "tensor"),
    ("audio_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("adapter_hidden", "tensor"),
    # the projector's first kernel [k * d, 2048] (6400 rows for large-v3): without this its
    # fp32 master copy and both Adam moments would be replicated on every device
    ("adapter_in", "fsdp"),
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), axis_names: Sequence[str] = MESH_AXES,
              devices=None) -> Mesh:
    """Builds a mesh with axes (data, fsdp, tensor); one entry of `shape` may be -1 (fills).

    Auto axis types are used (annotate and let XLA propagate), the classic GSPMD style.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != len(axis_names):
        raise ValueError(f"mesh shape {shape} does not match axis names {tuple(axis_names)}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                         f"have {len(devices)}")
    dev = np.asarray(devices).reshape(shape)
    try:
        from jax.sharding import AxisType
        return Mesh(dev, tuple(axis_names), axis_types=(AxisType.Auto,) * len(axis_names))
    except (ImportError, TypeError):  # older jax
        return Mesh(dev, tuple(axis_names))


def rules_from_config(rules) -> Tuple[Tuple[str, object], ...]:
    """Normalises rules given as a list of [name, axis-or-list-or-None] (config data)."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for name, axes in rules:
        if isinstance(axes, list):
            axes = tuple(axes)
        out.append((name, axes))
    return tuple(out)


def logical_to_sharding(logical_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """Maps a tree of logical PartitionSpecs (from `nn.get_partition_spec`) to NamedShardings.

    A mesh axis of size 1 or a dimension it would not divide is simply left to replication
    by callers via `fit_sharding` when shapes are known.
    """
    specs = nn.logical_to_mesh(logical_tree, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops mesh axes from `spec` where they do not divide the dimension (tiny test models)."""
    out = []
    for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        size = int(np.prod([mesh.shape[a] for a in names]))
        out.append(axes if shape[i] % size == 0 else None)
    return P(*out)


def param_shardings(abstract_boxed_params, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a boxed (nn.LogicallyPartitioned) parameter tree of abstract arrays.

    Uses the logical names the layers declare and the rules; dims that a mesh axis does not
    divide fall back to replication.
    """
    logical = nn.get_partition_spec(abstract_boxed_params)
    mesh_specs = nn.logical_to_mesh(logical, rules)
    unboxed = nn.meta.unbox(abstract_boxed_params)
    return jax.tree.map(
        lambda s, x: NamedSharding(mesh, fit_spec(s, x.shape, mesh)),
        mesh_specs, unboxed, is_leaf=lambda x: isinstance(x, P))


def constrain(x, names):
    """Logical sharding constraint on an activation (no-op outside a mesh / rules context)."""
    return nn.with_logical_constraint(x, names)
