"""Models ready for inference: from a config file (`configs/*.py`), a training workdir
(config.json + checkpoints/) or a converted checkpoint directory.

Parameters are restored straight into the model's tree: the loaders read every part a
checkpoint holds, and only the parts nothing holds (a fresh adapter of a random tiny model)
are initialised, so no full model is ever initialised only to be overwritten.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from freezeempath_jax import sharding as sharding_lib
from freezeempath_jax.checkpoints.model_tree import abstract_boxed_params, init_missing
from freezeempath_jax.checkpoints.orbax_io import load_converted
from freezeempath_jax.checkpoints.workdir import init_path, load_init_parts
from freezeempath_jax.inference.chat import MAX_SECONDS, ChatModel
from freezeempath_jax.models.configs import FreezeEmpathConfig, from_dict, to_dict, to_dtype
from freezeempath_jax.real_models import is_spec, resolve_model_path
from freezeempath_jax.text.tokenizers import load_tokenizer, make_tokenizer
from freezeempath_jax.tree import cast_floating, flatten_with_paths, unflatten


def load_config_file(path: str):
    """`get_config()` of a `configs/*.py` file (`file.py:arg` passes `arg` to it)."""
    arg = None
    if ":" in os.path.basename(path):
        path, arg = path.rsplit(":", 1)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location("_chat_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise ValueError(f"config file {path!r} defines no get_config()")
    return mod.get_config() if arg is None else mod.get_config(arg)


def model_from_training_config(cfg, workdir: Optional[str] = None,
                               init_overrides: Optional[Mapping[str, str]] = None,
                               **kwargs) -> ChatModel:
    """A ChatModel from a training config (ConfigDict or dict): the parts `config.init` names
    (and the trained parts of `init.previous` workdirs and of `workdir`), restored straight
    into the model's tree; only parts no source holds are initialised randomly, as the
    trainer initialises them (seeded by `train.seed`). Everything is cast to
    `train.frozen_dtype` (float32 when unset). `init_overrides` ({"llm" | "whisper" |
    "freezeempath": path}) replaces what `config.init` names; `pypi:` package specs there
    resolve in this environment (`real_models.resolve_model_path`)."""
    get = _getter(cfg)
    model_cfg = from_dict(FreezeEmpathConfig, get(cfg, "model"))
    train, data, init = (get(cfg, "train", {}) or {}, get(cfg, "data", {}) or {},
                         get(cfg, "init", {}) or {})
    dtype = to_dtype(get(train, "frozen_dtype", "float32") or "float32")
    mesh = kwargs.get("mesh")
    if mesh is not None:
        kwargs.setdefault("rules", get(get(cfg, "mesh", {}) or {}, "rules", None))
    params = _assemble(model_cfg, load_init_parts(init, dtype, [workdir] if workdir else [],
                                                  overrides=init_overrides),
                       int(get(train, "seed", 0) or 0), dtype, mesh, kwargs.get("rules"))
    spec = get(data, "tokenizer", "byte") or "byte"
    if spec == "auto":  # as the trainer reads it: the tokenizer stored with the LLM weights
        spec = (init_path(init, "freezeempath", init_overrides)
                or init_path(init, "llm", init_overrides))
        if not spec:
            raise ValueError("data.tokenizer='auto' takes the tokenizer of init.llm or "
                             "init.freezeempath, but neither is set")
    elif is_spec(spec):
        spec = resolve_model_path(spec)
    tok = make_tokenizer(model_cfg, spec)
    kwargs.setdefault("chat_template", get(data, "chat_template", "plain") or "plain")
    # dual thinking follows the recipe the checkpoint was trained with unless the caller says
    kwargs.setdefault("dual_thinking", bool(get(data, "dual_thinking", False)))
    # the unit temperature the checkpoint's recipe speaks best at (the demo's decoder: 0.3)
    ut = get(data, "unit_temperature", None)
    kwargs.setdefault("unit_temperature", 1.0 if ut is None else float(ut))
    kwargs.setdefault("audio_seconds", float(get(data, "audio_seconds", MAX_SECONDS)
                                             or MAX_SECONDS))
    return ChatModel(model_cfg, params, tok, **kwargs)


def _getter(cfg):
    if isinstance(cfg, dict):
        return lambda d, k, default=None: d.get(k, default)
    return lambda d, k, default=None: getattr(d, k, default)


def _assemble(model_cfg: FreezeEmpathConfig, loaded: dict, seed: int, dtype, mesh=None,
              rules=None) -> dict:
    """The full parameter tree: `loaded` leaves checked against the model's abstract tree,
    the rest initialised (only they are computed), every float leaf in `dtype`. With a
    `mesh`, each leaf goes from the host straight into its sharding (`rules`, default
    training's) and the missing ones are initialised sharded."""
    boxed = abstract_boxed_params(model_cfg)
    want = flatten_with_paths(nn.meta.unbox(boxed))
    shardings = None
    if mesh is not None:
        shardings = flatten_with_paths(sharding_lib.param_shardings(
            boxed, mesh, sharding_lib.rules_from_config(rules)))
    given = flatten_with_paths(loaded)
    unknown = sorted(set(given) - set(want))
    if unknown:
        raise ValueError(f"loaded parameters the model does not have: {unknown[:8]}")
    for k, v in given.items():
        if tuple(np.shape(v)) != tuple(want[k].shape):
            raise ValueError(f"parameter {k}: loaded shape {np.shape(v)}, model shape "
                             f"{tuple(want[k].shape)}")
    p_rng, _ = jax.random.split(jax.random.PRNGKey(seed))  # as `TrainStep.init` splits it
    missing = [k for k in want if k not in given]
    if mesh is None:
        flat = dict(init_missing(model_cfg, p_rng, missing))
    else:  # the mesh only (as the trainer does): output shardings say where leaves go
        with jax.set_mesh(mesh):
            flat = dict(init_missing(model_cfg, p_rng, missing, shardings))
    for k, v in given.items():
        if shardings is None:
            flat[k] = jnp.asarray(v)
        else:  # cast on the host first: the device holds only its shard, in `dtype`
            v = np.asarray(v)
            if jnp.issubdtype(v.dtype, jnp.floating):
                v = v.astype(dtype)
            flat[k] = jax.device_put(v, shardings[k])
    return cast_floating(unflatten({k: flat[k] for k in want}), dtype)


def load_chat_model(model: Union[str, os.PathLike, FreezeEmpathConfig],
                    init_overrides: Optional[Mapping[str, str]] = None, **kwargs) -> ChatModel:
    """A ChatModel from a config file (`configs/*.py`), a training workdir (config.json +
    checkpoints/) or a converted checkpoint directory (the checkpoints package's format).

    init_overrides: {"llm" | "whisper" | "freezeempath": path} used instead of the frozen
    parts a config or workdir names (`chat --llm / --whisper / --release`): a checkpoint
    trained in another environment. A frozen part that cannot be found raises one
    `MissingModelError` line naming the config key, the path and the flag. kwargs go to
    `ChatModel` (history, max_context, mesh, rules, ...); `mesh` may be a Mesh, a shape or a
    "DATAxFSDPxTENSOR" string (`sharding.parse_mesh`); a training config's `mesh.rules` are
    used unless `rules` is given."""
    if kwargs.get("mesh") is not None and not isinstance(kwargs["mesh"], jax.sharding.Mesh):
        m = kwargs["mesh"]
        kwargs["mesh"] = sharding_lib.make_mesh(sharding_lib.parse_mesh(m) if isinstance(m, str)
                                                else tuple(m))
    if isinstance(model, FreezeEmpathConfig):
        return model_from_training_config({"model": to_dict(model)}, **kwargs)
    path = os.fspath(model)
    if path.split(":")[0].endswith(".py"):
        return model_from_training_config(load_config_file(path),
                                          init_overrides=init_overrides, **kwargs)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path!r}: not a config file (.py) or a checkpoint "
                                "directory")
    if os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(
            os.path.join(path, "checkpoints")):
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        return model_from_training_config(cfg, workdir=path, init_overrides=init_overrides,
                                          **kwargs)
    kind, config, params = load_converted(path)
    if kind != "freezeempath":
        raise ValueError(f"{path!r} holds a converted {kind!r} checkpoint; chat needs a full "
                         "FreezeEmpath model (convert --kind freezeempath)")
    tok_dir = os.path.join(path, "tokenizer")
    if not os.path.isdir(tok_dir):
        raise FileNotFoundError(f"{path!r} has no tokenizer/ folder; convert the checkpoint "
                                "with its tokenizer")
    kwargs.setdefault("chat_template", "qwen")
    return ChatModel(config, params, load_tokenizer(tok_dir), **kwargs)


