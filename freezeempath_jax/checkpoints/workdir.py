"""Reading what a training config points at: the checkpoints of `config.init` and the trained
parameters a stage saved in its workdir, for the next stage, for chat and for evaluation. (Writing and resuming checkpoints is the trainer's
`train.checkpointing`; both agree on the layout below.)

    <workdir>/config.json                the resolved training config
    <workdir>/checkpoints/<step>/state   TrainState: trainable parameters, optimizer state, ...
    <workdir>/checkpoints/<step>/data    per-host data iterator position
    <workdir>/checkpoints/<step>/meta    JSON: stage, step, metrics, config
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Iterable, Mapping, Optional

import jax
import orbax.checkpoint as ocp

from freezeempath_jax.checkpoints.causal_lm import load_causal_lm
from freezeempath_jax.checkpoints.release import load_freezeempath
from freezeempath_jax.checkpoints.whisper import load_whisper_encoder
from freezeempath_jax.tree import merge_into

log = logging.getLogger(__name__)

STATE, DATA, META = "state", "data", "meta"


def checkpoint_dir(workdir: str) -> str:
    """`<workdir>/checkpoints`, absolute."""
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def load_trained_params(workdir: str, step: Optional[int] = None):
    """The trainable parameters saved in `workdir` (newest step unless given), as a nested
    dict of host numpy arrays - how a later stage or `chat` picks up a trained part."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints under {directory}")
    with ocp.CheckpointManager(directory, item_names=(STATE, DATA, META),
                               options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory} holds no complete checkpoint")
        restored = mngr.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.PyTreeRestore(), META: ocp.args.JsonRestore()}))
    state = restored[STATE]
    params = state["params"] if isinstance(state, Mapping) else state.params
    return jax.tree.map(lambda a: jax.device_get(a), params), dict(restored[META] or {})


def _get(section, key, default=None):
    if section is None:
        return default
    if isinstance(section, Mapping):
        return section.get(key, default)
    return getattr(section, key, default)


def load_init_parts(init, dtype, workdirs: Iterable[str] = ()) -> Dict[str, Any]:
    """Every parameter a training config's `init` section names, as one tree: the release
    (`init.freezeempath`, with `init.whisper` when the release lacks the encoder) or the
    separate Whisper / LLM checkpoints, in `dtype`; then the trained parts saved in each
    `init.previous` workdir and in `workdirs`, over them (as saved: fp32 host arrays).

    init: a ConfigDict or dict (`whisper`, `llm`, `freezeempath`, `previous`). Parts no
    source names are absent from the result (they are initialised randomly by the caller).
    """
    loaded: Dict[str, Any] = {}
    if _get(init, "freezeempath"):
        _, params = load_freezeempath(_get(init, "freezeempath"),
                                      whisper=_get(init, "whisper") or None, dtype=dtype)
        loaded.update(params)
    else:
        if _get(init, "whisper"):
            loaded["whisper"] = load_whisper_encoder(_get(init, "whisper"), dtype=dtype)[1]
        if _get(init, "llm"):
            loaded["llm"] = load_causal_lm(_get(init, "llm"), dtype=dtype)[1]
    for prev in list(_get(init, "previous", ()) or ()) + list(workdirs):
        trained, meta = load_trained_params(prev)
        log.info("init: trained parts of stage %s from %s", meta.get("stage", "?"), prev)
        loaded = merge_into(loaded, trained)
    return loaded
