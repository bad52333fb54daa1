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

import contextlib
from typing import Optional, Sequence, Tuple

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


def dedup_logical_names(boxed):
    """Replaces repeated logical names within one parameter by None (a mesh axis can shard
    only one dimension of an array)."""
    def one(x):
        if not isinstance(x, nn.LogicallyPartitioned):
            return x
        seen, names = set(), []
        for n in x.names:
            names.append(None if n is not None and n in seen else n)
            seen.add(n)
        return x.replace(names=tuple(names))
    return jax.tree.map(one, boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def param_shardings(abstract_boxed_params, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a boxed (nn.LogicallyPartitioned) parameter tree of abstract arrays.

    Uses the logical names the layers declare and the rules; dims that a mesh axis does not
    divide fall back to replication, and a name repeated within one parameter (a square conv
    kernel (k, audio_embed, audio_embed)) is sharded on its first dimension only.
    """
    abstract_boxed_params = dedup_logical_names(abstract_boxed_params)
    logical = nn.get_partition_spec(abstract_boxed_params)
    mesh_specs = nn.logical_to_mesh(logical, rules)
    unboxed = nn.meta.unbox(abstract_boxed_params)
    return jax.tree.map(
        lambda s, x: NamedSharding(mesh, fit_spec(s, x.shape, mesh)),
        mesh_specs, unboxed, is_leaf=lambda x: isinstance(x, P))


def constrain(x, names):
    """Logical sharding constraint on an activation (no-op outside a mesh / rules context).

    Mesh axes that do not divide a dimension are dropped for that dimension (as `fit_spec`
    does for parameters): a batch of 2 rows on an 8-way batch axis, or 4 heads on an 8-way
    tensor axis, stays replicated there instead of failing to compile, so inference can run
    any batch on the mesh and rules training uses.
    """
    rules = nn.get_logical_axis_rules()
    if not rules:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return nn.with_logical_constraint(x, names)
    spec = nn.logical_to_mesh_axes(tuple(names), rules)
    return jax.lax.with_sharding_constraint(x, fit_spec(spec, x.shape, mesh))


def parse_mesh(text: str) -> Tuple[int, ...]:
    """"DATAxFSDPxTENSOR" (e.g. "1x-1x1", "2x4x1") -> a mesh shape for `make_mesh`."""
    try:
        shape = tuple(int(d) for d in str(text).lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != len(MESH_AXES) or any(d == 0 or d < -1 for d in shape):
        raise ValueError(f"mesh {text!r}: expected DATAxFSDPxTENSOR with positive sizes (one "
                         f"may be -1), e.g. 1x-1x1 for {MESH_AXES}")
    return shape


@contextlib.contextmanager
def mesh_rules(mesh: Optional[Mesh], rules=DEFAULT_RULES):
    """Context for tracing and running jitted code on `mesh` under logical-axis `rules`
    (read by `constrain` at trace time); does nothing when mesh is None."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def place_params(params, abstract_boxed, mesh: Mesh, rules=DEFAULT_RULES):
    """Each leaf of `params` (host or device arrays, the unboxed tree of `abstract_boxed`)
    put straight into its sharding on `mesh` (`param_shardings`): a host array is sliced
    per device, never gathered whole on one device. Shapes must match the abstract tree."""
    shardings = param_shardings(abstract_boxed, mesh, rules)
    unboxed = nn.meta.unbox(abstract_boxed)

    def one(path, x, want, sh):
        if tuple(np.shape(x)) != tuple(want.shape):
            raise ValueError(f"parameter {jax.tree_util.keystr(path)}: shape {np.shape(x)}, "
                             f"model shape {tuple(want.shape)}")
        return jax.device_put(x, sh)

    return jax.tree_util.tree_map_with_path(one, params, unboxed, shardings)
