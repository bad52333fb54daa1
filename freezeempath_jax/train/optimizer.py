"""AdamW with warmup + cosine decay, global-norm clipping and a no-decay mask, behind a
`multi_transform` guard built from the freezing table.

The optimizer only ever sees the trainable subtree (frozen parameters live outside the train
state), so the guard normally labels every leaf "trainable". It is there so that a frozen leaf
that reaches the optimizer by mistake gets a zero update and no moment buffers instead of
silently training.
"""

from __future__ import annotations

import math
import re
from typing import Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from freezeempath_jax import params as P_
from freezeempath_jax.params import FROZEN, NO_DECAY_REGEX, TRAINABLE


def warmup_steps(total_steps: int, warmup_fraction: float) -> int:
    """Warmup length: `warmup_fraction` of the run, rounded up, at least 1 step."""
    return max(1, int(math.ceil(total_steps * warmup_fraction)))


def make_schedule(learning_rate: float, total_steps: int, warmup_fraction: float = 0.03,
                  end_lr_fraction: float = 0.0) -> optax.Schedule:
    """Linear warmup to `learning_rate` over `warmup_fraction` of `total_steps`, then cosine
    decay towards `end_lr_fraction * learning_rate` (DESIGN.md section 5: 3% warmup, cosine).

    The schedule is read at the optimizer's update count shifted by one, so the first update
    already uses `learning_rate / warmup` (not 0) and the last of `total_steps` updates a small
    positive rate: no step of the run is wasted.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
    warm = warmup_steps(total_steps, warmup_fraction)
    base = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warm,
        decay_steps=max(total_steps, warm) + 1, end_value=learning_rate * end_lr_fraction)
    return lambda count: base(count + 1)


def make_optimizer(table, *, learning_rate: float, total_steps: int,
                   warmup_fraction: float = 0.03, end_lr_fraction: float = 0.0,
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, grad_clip_norm: Optional[float] = 1.0,
                   no_decay_regex: str = NO_DECAY_REGEX) -> optax.GradientTransformation:
    """The training optimizer.

    table: the freezing table (`params.stage_table`); leaves labelled "frozen" get
      `optax.set_to_zero()` (no state, zero update), "trainable" leaves get
      clip -> AdamW(schedule, weight decay on leaves not matching `no_decay_regex`).
    The clipping norm covers trainable leaves only (multi_transform hides the others).
    """
    table = P_.normalize_table(table)
    labels_seen = {label for _, label in table}
    unknown = labels_seen - {TRAINABLE, FROZEN}
    if unknown:
        raise ValueError(f"optimizer labels must be {TRAINABLE!r} or {FROZEN!r}, "
                         f"table has {sorted(unknown)}")
    schedule = make_schedule(learning_rate, total_steps, warmup_fraction, end_lr_fraction)
    decay_rx = re.compile(no_decay_regex)

    def decay_mask(tree):
        return jax.tree_util.tree_map_with_path(
            lambda p, _: not decay_rx.fullmatch(P_.path_str(p)), tree)

    parts = []
    if grad_clip_norm:
        parts.append(optax.clip_by_global_norm(grad_clip_norm))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=decay_mask))
    trainable = optax.chain(*parts)
    return optax.multi_transform({TRAINABLE: trainable, FROZEN: optax.set_to_zero()},
                                 lambda tree: P_.label_tree(tree, table))


def _dict_path(path) -> str:
    """The parameter path inside an optimizer-state key path: parameter-shaped subtrees are
    nested dicts under attribute / tuple keys of the optax states; multi_transform adds one
    dict level keyed by the label ("trainable" / "frozen"), which is dropped."""
    keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    if keys and keys[0] in (TRAINABLE, FROZEN):
        keys = keys[1:]
    return "/".join(keys)


def opt_state_shardings(abstract_opt_state, param_shardings, params_abstract, mesh):
    """Shardings of an optimizer state: moment buffers shaped like a parameter take that
    parameter's sharding; everything else (step counts, empty states) is replicated.

    abstract_opt_state: `jax.eval_shape(tx.init, params)`; param_shardings / params_abstract:
    trees with the parameters' structure.
    """
    by_path = P_.flatten_with_paths(param_shardings)
    shapes = {p: x.shape for p, x in P_.flatten_with_paths(params_abstract).items()}
    replicated = NamedSharding(mesh, P())

    def one(path, leaf):
        p = _dict_path(path)
        if p in by_path and tuple(getattr(leaf, "shape", ())) == tuple(shapes[p]):
            return by_path[p]
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def opt_state_param_paths(opt_state):
    """Parameter paths that own array entries in an optimizer state (for tests and audits):
    the dict-key paths of every non-scalar leaf."""
    out = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        if jnp.ndim(leaf) > 0:
            out.add(_dict_path(path))
    return out
