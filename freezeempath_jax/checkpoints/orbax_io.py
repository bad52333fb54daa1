"""Our own checkpoint format: an orbax parameter tree plus the config as JSON beside it.

    DIR/params/          orbax (OCDBT, sharded arrays; restore onto any mesh)
    DIR/config.json      {"format": "freezeempath-jax", "kind": ..., "config": {...}, ...}
    DIR/tokenizer/       optional, the tokenizer saved with save_pretrained

`convert` turns any supported input (Whisper, causal LM, FreezeEmpath release) into it;
`freezeempath-jax convert --kind K --from PATH --out DIR` calls it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Optional, Tuple

import jax
import numpy as np

from freezeempath_jax.checkpoints.assemble import flatten, unflatten
from freezeempath_jax.checkpoints.errors import CheckpointError, Problem
from freezeempath_jax.models import configs as C

FORMAT = "freezeempath-jax"
PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
KINDS = {"whisper": C.WhisperConfig, "llm": C.LMConfig, "freezeempath": C.FreezeEmpathConfig,
         "unit_decoder": C.UnitDecoderConfig}


def _is_leaf(x):
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def select(params, subset_regex: Optional[str]):
    """The leaves whose `/`-joined path fully matches `subset_regex` (all when None).
    Boxed (logically partitioned) trees from `Module.init` are unboxed first."""
    from flax import linen as nn

    flat = flatten(nn.meta.unbox(params), is_leaf=_is_leaf)
    if subset_regex is None:
        return unflatten(flat)
    pattern = re.compile(subset_regex)
    kept = {k: v for k, v in flat.items() if pattern.fullmatch(k)}
    if not kept:
        raise ValueError(f"subset {subset_regex!r} matches no parameter; paths look like "
                         f"{sorted(flat)[:5]}")
    return unflatten(kept)


def merge_params(base, update):
    """`base` with the leaves of `update` (e.g. a restored trainable subset) put in."""
    flat = flatten(base, is_leaf=_is_leaf)
    flat.update(flatten(update, is_leaf=_is_leaf))
    return unflatten(flat)


def save_params(directory: str, params, subset_regex: Optional[str] = None, *, config=None,
                kind: Optional[str] = None, overwrite: bool = False, extra: Optional[dict] = None
                ) -> str:
    """Saves `params` (or the subset matching `subset_regex`) with orbax under
    `directory/params`, and `config` (a config dataclass) as JSON in `directory/config.json`.

    Arrays keep their shardings: each host writes its own shards. Returns `directory`.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    target = os.path.join(directory, PARAMS_DIR)
    if os.path.exists(target):
        if not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
        shutil.rmtree(target)
    os.makedirs(directory, exist_ok=True)
    tree = select(params, subset_regex)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(target, tree)
    if config is not None or kind is not None:
        save_config(directory, config, kind, subset_regex=subset_regex, extra=extra)
    return directory


def save_config(directory: str, config, kind: Optional[str] = None, *,
                subset_regex: Optional[str] = None, extra: Optional[dict] = None) -> str:
    """Writes `directory/config.json` for a config dataclass (kind inferred from its type)."""
    if kind is None:
        kind = next((k for k, cls in KINDS.items() if isinstance(config, cls)), None)
    doc = {"format": FORMAT, "version": 1, "kind": kind,
           "config": C.to_dict(config) if config is not None else None,
           "subset": subset_regex}
    doc.update(extra or {})
    path = os.path.join(directory, CONFIG_FILE)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return path


def load_config(directory: str) -> Tuple[str, Any]:
    """(kind, config dataclass) from `directory/config.json` written by `save_config`."""
    path = os.path.join(os.fspath(directory), CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(directory, [Problem("file", file=path, detail="file not found")])
    with open(path) as f:
        doc = json.load(f)
    if doc.get("format") != FORMAT:
        raise CheckpointError(directory, [Problem("architecture", key="format", file=path,
                                                  expected=FORMAT, actual=doc.get("format"))])
    kind = doc.get("kind")
    if kind not in KINDS:
        raise CheckpointError(directory, [Problem("architecture", key="kind", file=path,
                                                  expected=sorted(KINDS), actual=kind)])
    return kind, C.from_dict(KINDS[kind], doc["config"])


def restore_params(directory: str, target=None):
    """Restores a tree saved by `save_params`.

    target: None (every array on the default device, dtypes as saved), or an abstract tree
    (`jax.ShapeDtypeStruct` leaves with `sharding`, e.g. from `jax.eval_shape` + shardings)
    saying how to lay each array out; leaves the checkpoint lacks are dropped from the
    target, so a full-model target restores a saved subset. Arrays the target lacks are
    not read.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    path = os.path.join(directory, PARAMS_DIR)
    if not os.path.isdir(path):
        path = directory  # a bare orbax directory
    if not os.path.isfile(os.path.join(path, "_CHECKPOINT_METADATA")) and not os.path.isfile(
            os.path.join(path, "_METADATA")):
        raise CheckpointError(directory, [Problem("file", file=path,
                                                  detail="no orbax checkpoint here")])
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path).item_metadata.tree
        saved = flatten(meta, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
        if target is None:
            dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            abstract = {k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev)
                        for k, m in saved.items()}
        else:
            want = flatten(target, is_leaf=_is_leaf)
            problems = [Problem("shape", key=k, expected=tuple(want[k].shape),
                                actual=tuple(saved[k].shape), file=path)
                        for k in want if k in saved and tuple(want[k].shape) != tuple(
                            saved[k].shape)]
            if problems:
                raise CheckpointError(directory, problems)
            abstract = {k: _abstract(want[k]) for k in want if k in saved}
            abstract.update({k: jax.ShapeDtypeStruct(
                m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
                for k, m in saved.items() if k not in want})
        tree = unflatten(abstract)
        return ckptr.restore(path, tree)


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def load_converted(directory: str, target=None):
    """(kind, config, params) of a directory written by `convert` or `save_params`."""
    kind, config = load_config(directory)
    return kind, config, restore_params(directory, target)


def converted_kind(path) -> Optional[str]:
    """The kind ("whisper", "llm", "freezeempath") of a directory in our format, else None."""
    cfg_path = os.path.join(os.fspath(path), CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        return None
    try:
        with open(cfg_path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc.get("kind") if isinstance(doc, dict) and doc.get("format") == FORMAT else None


def load_converted_part(path, kind: str, dtype_of, *, shardings=None, mesh=None, rules=None):
    """`(config, params)` of a converted `kind` directory, as the format loaders return them.

    Lets every loader (`load_whisper_encoder`, `load_causal_lm`, `load_freezeempath`) and so
    `config.init.*` of the trainer take our own format too. Each leaf is read straight into
    its place (the shardings of `shardings`, or of the model's logical axes on `mesh`) and
    cast to `dtype_of(path)`; missing, unexpected and mis-shaped leaves are reported together.
    """
    import dataclasses

    import jax.numpy as jnp
    from flax import linen as nn

    from freezeempath_jax.checkpoints.model_tree import (abstract_params, causal_lm_init,
                                                         dtype_name, freezeempath_init,
                                                         make_placer, verify, whisper_init)

    got, config = load_config(path)
    if got != kind:
        raise CheckpointError(path, [Problem("architecture", key="kind",
                                             file=os.path.join(path, CONFIG_FILE),
                                             expected=kind, actual=got)])
    if kind in ("whisper", "llm"):
        config = dataclasses.replace(config, param_dtype=dtype_name(dtype_of("")))
    else:  # the sub-configs state the dtypes their parts are returned in
        sub = {name: dataclasses.replace(getattr(config, name),
                                         param_dtype=dtype_name(dtype_of(name + "/")))
               for name in ("whisper", "llm")}
        config = dataclasses.replace(config, **sub)
    init = {"whisper": whisper_init, "llm": causal_lm_init,
            "freezeempath": freezeempath_init}[kind](config)
    placer = make_placer(init, shardings, mesh, rules)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = flatten(nn.meta.unbox(abstract_params(init)),
                       is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    target = {k: jax.ShapeDtypeStruct(v.shape, jnp.dtype(dtype_of(k)),
                                      sharding=placer.sharding_for(k, v.shape) or default)
              for k, v in abstract.items()}
    flat = flatten(restore_params(path, unflatten(target)), is_leaf=_is_leaf)
    verify(flat, init, os.fspath(path))
    # orbax keeps the saved dtype where the target's differs only in precision: cast here
    flat = {k: v if v.dtype == target[k].dtype else v.astype(target[k].dtype)
            for k, v in flat.items()}
    return config, unflatten(flat)


def convert(kind: str, src: str, out_dir: str, dtype=None, *, whisper: Optional[str] = None,
            frozen_dtype=None, tokenizer: Optional[str] = None, overwrite: bool = False) -> str:
    """Converts a checkpoint of `kind` ("whisper", "llm", "freezeempath" or "unit_decoder",
    the release's units-to-waveform folder) at `src` into our
    format under `out_dir` and returns `out_dir`.

    dtype: parameter dtype (default float32; for "freezeempath" the trainable parts, with
    `frozen_dtype` for the Whisper encoder and LLM, bf16 by default).
    whisper: the Whisper checkpoint for a release without the encoder inside.
    tokenizer: a tokenizer directory or .gguf to save beside the weights (default: the one in
    `src` when there is one).
    """
    import jax.numpy as jnp

    from freezeempath_jax.checkpoints import tokenizer as tk
    from freezeempath_jax.checkpoints.causal_lm import find_gguf, load_causal_lm
    from freezeempath_jax.checkpoints.release import load_freezeempath
    from freezeempath_jax.checkpoints.whisper import load_whisper_encoder

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {sorted(KINDS)}")
    dtype = jnp.float32 if dtype is None else dtype
    if kind == "whisper":
        config, params = load_whisper_encoder(src, dtype)
    elif kind == "llm":
        config, params = load_causal_lm(src, dtype)
    elif kind == "unit_decoder":
        from freezeempath_jax.checkpoints.unit_decoder import load_unit_decoder

        config, params = load_unit_decoder(src, dtype)
    else:
        config, params = load_freezeempath(
            src, whisper=whisper, dtype=dtype,
            frozen_dtype=jnp.bfloat16 if frozen_dtype is None else frozen_dtype)
    save_params(out_dir, params, config=config, kind=kind, overwrite=overwrite,
                extra={"source": os.path.abspath(os.fspath(src))})
    if tokenizer is None and kind not in ("whisper", "unit_decoder"):
        if tk.has_tokenizer(src):
            tokenizer = src
        elif kind == "llm" and find_gguf(src) and _gguf_has_tokenizer(find_gguf(src)):
            # weights-only GGUF exports exist; their weights still convert, without tokenizer
            tokenizer = find_gguf(src)
    if tokenizer is not None:
        tk.load_tokenizer(tokenizer).save_pretrained(os.path.join(out_dir, TOKENIZER_DIR))
    return out_dir


def _gguf_has_tokenizer(path: str) -> bool:
    """Whether a GGUF file carries llama.cpp tokenizer metadata (`tokenizer.ggml.model`)."""
    from freezeempath_jax.checkpoints.gguf_io import GGUFSource

    return GGUFSource(path).field("tokenizer.ggml.model") is not None
