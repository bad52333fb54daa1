"""What the model itself expects: abstract parameter trees, their shardings, and a final check
that a loaded tree matches the module exactly (catches a key table out of step with a model).
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
from flax import linen as nn

from freezeempath_jax.checkpoints.assemble import Placer, flatten
from freezeempath_jax.checkpoints.errors import CheckpointError, Problem


def abstract_params(init: Callable[[], Any]):
    """Boxed abstract params of `init()` (a thunk calling `module.init`), no memory used."""
    return jax.eval_shape(init)["params"]


def whisper_init(config):
    from freezeempath_jax.models.whisper import WhisperEncoder

    frames = 2 * config.max_source_positions
    return lambda: WhisperEncoder(config).init(
        jax.random.key(0), jnp.zeros((1, config.n_mels, frames), jnp.float32))


def causal_lm_init(config):
    from freezeempath_jax.models.causal_lm import CausalLM

    return lambda: CausalLM(config).init(jax.random.key(0),
                                         input_ids=jnp.zeros((1, 1), jnp.int32))


def freezeempath_init(config):
    """Init of the composite that also reaches every speech-decoder parameter."""
    from freezeempath_jax.models.freezeempath import FreezeEmpath

    frames = 2 * config.whisper.max_source_positions
    mel = jnp.zeros((1, config.whisper.n_mels, frames), jnp.float32)
    ids = jnp.zeros((1, 4), jnp.int32)

    def touch_all(m, mel, ids):
        out = m(mel, ids)
        if config.speech_decoder is not None:
            x = m.speech_decoder.fuse(jnp.zeros((1, 4, config.llm.hidden_size)), ids)
            m.speech_decoder(x)
        return out

    return lambda: FreezeEmpath(config).init(jax.random.key(0), mel, ids, method=touch_all)


def mesh_shardings(init: Callable[[], Any], mesh, rules=None):
    """NamedShardings of the module's parameters on `mesh`, from their logical axis names and
    `rules` (default `sharding.DEFAULT_RULES`).

    A name repeated within one parameter (Whisper's conv2 kernel is (conv_k, audio_embed,
    audio_embed)) keeps only its first occurrence: a mesh axis can shard one dimension only,
    and flax refuses the repeated name outright.
    """
    from freezeempath_jax import sharding as sh

    def first_only(x):
        if not isinstance(x, nn.LogicallyPartitioned):
            return x
        seen, names = set(), []
        for n in x.names:
            names.append(None if n in seen else n)
            if n is not None:
                seen.add(n)
        return x.replace(names=tuple(names))

    boxed = jax.tree.map(first_only, abstract_params(init),
                         is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    return sh.param_shardings(boxed, mesh, sh.DEFAULT_RULES if rules is None else rules)


def make_placer(init: Callable[[], Any], shardings=None, mesh=None, rules=None) -> Placer:
    """Placer from explicit `shardings` (tree or callable), or from the model's logical axis
    names resolved on `mesh` with `rules` (defaults: `sharding.DEFAULT_RULES`)."""
    if shardings is None and mesh is not None:
        shardings = mesh_shardings(init, mesh, rules)
    return Placer(shardings)


def verify(flat: Dict[str, Any], init: Callable[[], Any], origin: str,
           prefix: str = "") -> None:
    """Raises a CheckpointError if `flat` ({path: array}) differs from the module's tree."""
    expected = flatten(nn.meta.unbox(abstract_params(init)),
                       is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    expected = {prefix + k: v for k, v in expected.items()}
    problems = []
    for k, v in expected.items():
        if k not in flat:
            problems.append(Problem("missing", key=k, expected=tuple(v.shape),
                                    detail="the model has this parameter; the loader made none"))
        elif tuple(flat[k].shape) != tuple(v.shape):
            problems.append(Problem("shape", key=k, expected=tuple(v.shape),
                                    actual=tuple(flat[k].shape),
                                    detail="loaded parameter vs model parameter"))
    for k in flat:
        if k not in expected:
            problems.append(Problem("unexpected", key=k, actual=tuple(flat[k].shape),
                                    detail="loaded, but the model has no such parameter"))
    if problems:
        raise CheckpointError(origin, problems)


def dtype_name(dtype) -> str:
    """"float32" / "bfloat16" / ... for a config's param_dtype field."""
    return jnp.dtype(dtype).name

