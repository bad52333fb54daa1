"""Train state (trainable parameters only) and the frozen parameter tree kept beside it.

Frozen parameters (Whisper, the LLM, and whatever else the stage's table freezes) live outside
the state, cast to `frozen_dtype` (bf16 by default): they never get gradients, optimizer state
or checkpoint writes. The state holds the fp32 master copy of the trainable parameters.
"""

from __future__ import annotations

from typing import Any, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct

from freezeempath_jax import params as P_
from freezeempath_jax.tree import cast_floating


@struct.dataclass
class TrainState:
    """step: int32 scalar; params: trainable subtree (fp32 master weights); opt_state: the
    optimizer state over `params` only; rng: PRNG key advanced every step."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def create_state(trainable_params, tx: optax.GradientTransformation, rng,
                 master_dtype=jnp.float32) -> TrainState:
    """A fresh state at step 0 (trainable leaves cast to `master_dtype`)."""
    trainable_params = cast_floating(trainable_params, master_dtype)
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable_params,
                      opt_state=tx.init(trainable_params), rng=rng)


def split_params(params, table, frozen_dtype="bfloat16", master_dtype=jnp.float32
                 ) -> Tuple[Any, Any]:
    """(trainable fp32 master, frozen in `frozen_dtype`) from an unboxed full tree."""
    trainable, frozen = P_.split(nn.meta.unbox(params), P_.label_tree(
        nn.meta.unbox(params), table))
    return cast_floating(trainable, master_dtype), cast_floating(frozen, frozen_dtype)
