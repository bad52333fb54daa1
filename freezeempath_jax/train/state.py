"""Train state (trainable parameters only) and the frozen parameter tree kept beside it.

Frozen parameters (Whisper, the LLM, and whatever else the stage's table freezes) live outside
the state, cast to `frozen_dtype` (bf16 by default): they never get gradients, optimizer state
or checkpoint writes. The state holds the fp32 master copy of the trainable parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import struct

from freezeempath_jax import params as P_
from freezeempath_jax.models import streaming
from freezeempath_jax.models.configs import FreezeEmpathConfig, to_dtype
from freezeempath_jax.models.freezeempath import FreezeEmpath


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


def _touch_all(module: FreezeEmpath, mel, input_ids, layout, text_ids, unit_ids):
    """Init method reaching every part (FreezeEmpath.__call__ alone skips the speech
    decoder's input projection and gate)."""
    out = module(mel=mel, input_ids=input_ids)
    if module.config.speech_decoder is not None:
        h = out.hidden_states[:, : text_ids.shape[1]]
        module.speech_decoder.unit_loss(h, text_ids, unit_ids, layout)
    return out.logits


def _init_inputs(config: FreezeEmpathConfig):
    # Short inputs keep tracing and compiling cheap; parameter values depend only on the rng
    # and module paths, never on input lengths.
    frames = 4 * max(config.projector.k, 1)
    mel = jnp.zeros((1, config.whisper.n_mels, frames), jnp.float32)
    input_ids = jnp.zeros((1, 8), jnp.int32)
    text_ids = jnp.zeros((1, 2), jnp.int32)
    unit_ids = jnp.zeros((1, 3), jnp.int32)
    layout = None
    if config.speech_decoder is not None:
        sd = config.speech_decoder
        layout = streaming.build_layout([2], [3], sd.stream_n, sd.stream_m, sd.max_length,
                                        seq_len=8)
        layout = jax.tree.map(jnp.asarray, layout)
    return mel, input_ids, layout, text_ids, unit_ids


def init_boxed_params(config: FreezeEmpathConfig, rng):
    """Random parameters of every part, boxed with logical axis names (call under jit or
    `jax.eval_shape`: the forward pass used to reach every module is dead code there)."""
    config = dataclasses.replace(
        config, whisper=dataclasses.replace(config.whisper, allow_short_inputs=True))
    model = FreezeEmpath(config)
    return model.init(rng, *_init_inputs(config), method=_touch_all)["params"]


def abstract_boxed_params(config: FreezeEmpathConfig):
    """Shapes/dtypes (and logical names) of every parameter, without allocating any."""
    return jax.eval_shape(lambda r: init_boxed_params(config, r), jax.random.PRNGKey(0))


def split_params(params, table, frozen_dtype="bfloat16", master_dtype=jnp.float32
                 ) -> Tuple[Any, Any]:
    """(trainable fp32 master, frozen in `frozen_dtype`) from an unboxed full tree."""
    trainable, frozen = P_.split(nn.meta.unbox(params), P_.label_tree(
        nn.meta.unbox(params), table))
    return cast_floating(trainable, master_dtype), cast_floating(frozen, frozen_dtype)


def param_count(tree) -> int:
    """Number of scalars in a (possibly abstract) tree."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def host_random_params(abstract_params, seed: int = 0, std: float = 0.05):
    """Random parameters made with numpy on the host from an abstract (unboxed) tree: normal
    weights, ones for norm scales, zeros for biases. No XLA compilation at all, so tests and
    smoke runs avoid the cost of compiling every initializer; `init_boxed_params` gives the
    model's real initialisation."""
    rng = np.random.default_rng(seed)

    def one(path, x):
        name = P_.path_str(path).rsplit("/", 1)[-1]
        if name == "scale":
            v = np.ones(x.shape)
        elif name == "bias":
            v = np.zeros(x.shape)
        else:
            v = rng.normal(0.0, std, x.shape)
        return v.astype(x.dtype)

    return jax.tree_util.tree_map_with_path(one, abstract_params)
