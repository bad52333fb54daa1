"""What the model itself expects: abstract parameter trees, their shardings, random
initialisation (of the whole composite, or of only the parts a checkpoint lacks), and a final
check that a loaded tree matches the module exactly (catches a key table out of step with a
model). Training, chat and the loaders all build parameter trees through here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from freezeempath_jax import sharding as sh
from freezeempath_jax.checkpoints.assemble import Placer, flatten
from freezeempath_jax.checkpoints.errors import CheckpointError, Problem
from freezeempath_jax.models import streaming
from freezeempath_jax.models.causal_lm import CausalLM
from freezeempath_jax.models.configs import FreezeEmpathConfig
from freezeempath_jax.models.freezeempath import FreezeEmpath
from freezeempath_jax.models.whisper import WhisperEncoder
from freezeempath_jax.tree import flatten_with_paths, path_str


def abstract_params(init: Callable[[], Any]):
    """Boxed abstract params of `init()` (a thunk calling `module.init`), no memory used."""
    return jax.eval_shape(init)["params"]


def whisper_init(config):
    frames = 2 * config.max_source_positions
    return lambda: WhisperEncoder(config).init(
        jax.random.key(0), jnp.zeros((1, config.n_mels, frames), jnp.float32))


def causal_lm_init(config):
    return lambda: CausalLM(config).init(jax.random.key(0),
                                         input_ids=jnp.zeros((1, 1), jnp.int32))


def freezeempath_init(config):
    """Init of the composite that also reaches every speech-decoder parameter."""
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


# ---------------------------------------------------------------------------------------------
# Random initialisation of the composite model


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


def init_missing(config: FreezeEmpathConfig, rng, missing: Sequence[str], shardings=None):
    """Random values of only the parameter paths in `missing` (as `init_boxed_params(config,
    rng)` would give them), jitted so XLA computes those leaves alone: a model whose parts are
    mostly loaded is never initialised in full only to be overwritten.

    shardings: optional {path: sharding} for the outputs. Returns {path: array}.
    """
    missing = list(missing)
    if not missing:
        return {}

    def _init(r):
        flat = flatten_with_paths(nn.meta.unbox(init_boxed_params(config, r)))
        return {p: flat[p] for p in missing}

    out_sh = None if shardings is None else {p: shardings[p] for p in missing}
    return jax.jit(_init, out_shardings=out_sh)(rng)


def host_random_params(abstract_params, seed: int = 0, std: float = 0.05):
    """Random parameters made with numpy on the host from an abstract (unboxed) tree: normal
    weights, ones for norm scales, zeros for biases. No XLA compilation at all, so tests and
    smoke runs avoid the cost of compiling every initializer; `init_boxed_params` gives the
    model's real initialisation."""
    rng = np.random.default_rng(seed)

    def one(path, x):
        name = path_str(path).rsplit("/", 1)[-1]
        if name == "scale":
            v = np.ones(x.shape)
        elif name == "bias":
            v = np.zeros(x.shape)
        else:
            v = rng.normal(0.0, std, x.shape)
        return v.astype(x.dtype)

    return jax.tree_util.tree_map_with_path(one, abstract_params)
