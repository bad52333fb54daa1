"""Training checkpoints: orbax `CheckpointManager` over `<workdir>/checkpoints/<step>/`.

One checkpoint holds three items:
  state: the `TrainState` (trainable fp32 parameters, optimizer state, step, RNG), written
         asynchronously from its device shards;
  data:  the data iterator's position, one JSON file per host (`process_<i>-of-<n>.json`),
         so each host resumes its own stream (grain iterators and `batches.MemorySource`
         alike: anything with `get_state()` / `set_state()`);
  meta:  JSON: stage, step, the resolved config and the last metrics (for people and tools),
         and `checksums`: sha256 of each state leaf's host bytes, taken from the very arrays
         handed to the (async) save, so a restore can prove it read back what was written.
Frozen parameters are never written: they are reloaded from their source (a converted
checkpoint, or the seed for random tiny models).

Restoring verifies those checksums; a damaged newest step (unreadable, truncated, missing an
item, or silently different bytes) is moved to `<workdir>/damaged_checkpoints/` with a warning
and the newest intact step is used (`restore_newest`). Saves keep the newest `keep`
checkpoints. `Preemption` turns SIGTERM into a flag the loop
polls, so the loop can save and exit cleanly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import threading
import time
from typing import Any, Mapping, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from etils import epath


from freezeempath_jax.checkpoints.workdir import (CHECKSUMS, DATA, META, STATE,  # noqa: F401
                                                  CheckpointIntegrityError, checkpoint_dir,
                                                  newest_intact, state_checksums,
                                                  verify_state)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Per-host data iterator state


class DataStateHandler(ocp.CheckpointHandler):
    """Writes `item.get_state()` (a JSON-able dict, or bytes as grain's DataLoader returns)
    to one file per host and restores it with `item.set_state(...)`."""

    def _file(self, directory: epath.Path) -> epath.Path:
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: epath.Path, args: "DataStateSave"):
        state = args.item.get_state()
        if isinstance(state, bytes):
            payload = {"bytes": state.decode("latin-1")}
        else:
            payload = {"json": state}
        directory.mkdir(parents=True, exist_ok=True)
        self._file(directory).write_text(json.dumps(payload))

    def restore(self, directory: epath.Path, args: "DataStateRestore"):
        path = self._file(directory)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint was written by a job with a different "
                f"number of hosts than this one ({jax.process_count()})")
        payload = json.loads(path.read_text())
        state = payload["bytes"].encode("latin-1") if "bytes" in payload else payload["json"]
        args.item.set_state(state)
        return args.item

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    item: Any


# ---------------------------------------------------------------------------------------------


class Checkpointer:
    """Keep-N, optionally asynchronous checkpoints of (state, data position, meta)."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = checkpoint_dir(workdir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=(STATE, DATA, META))

    def latest_step(self) -> Optional[int]:
        """Newest complete checkpoint (unfinished temporary directories are ignored)."""
        return self.manager.latest_step()

    def save(self, step: int, state, data_source, meta: Mapping[str, Any],
             force: bool = True) -> bool:
        """Starts saving `state` at `step` (returns once device buffers are copied; the
        write continues in the background with async saves). The meta item gets the state's
        checksums, computed here from the same arrays before the write starts."""
        meta = dict(meta)
        meta[CHECKSUMS] = state_checksums(state)
        args = ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state),
            DATA: DataStateSave(data_source),
            META: ocp.args.JsonSave(_jsonable(meta)),
        })
        return self.manager.save(int(step), args=args, force=force)

    def restore(self, step: int, abstract_state, data_source) -> Tuple[Any, dict]:
        """(state, meta) at `step`, verified against the checksums saved with it
        (`CheckpointIntegrityError` when it differs); `abstract_state` holds
        ShapeDtypeStructs with shardings (the state is read directly into them);
        `data_source.set_state` is called."""
        args = ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract_state),
            DATA: DataStateRestore(data_source),
            META: ocp.args.JsonRestore(),
        })
        out = self.manager.restore(int(step), args=args)
        meta = dict(out[META] or {})
        verify_state(out[STATE], meta.get(CHECKSUMS), f"{self.directory}/{int(step)}")
        return out[STATE], meta

    def restore_newest(self, abstract_state, data_source) -> Tuple[Optional[int], Any, dict]:
        """(step, state, meta) of the newest checkpoint that restores and verifies, or
        (None, None, {}) when there is none. Damaged newer steps are logged (a warning
        naming each) and moved to `<workdir>/damaged_checkpoints/` so training can write
        those steps again; `CheckpointIntegrityError` (one line) when every step is
        damaged."""
        steps = self.manager.all_steps()
        if not steps:
            return None, None, {}
        step, (state, meta), bad = newest_intact(
            self.directory, steps,
            lambda s: self.restore(s, abstract_state, data_source))
        if bad:
            self._set_aside([s for s, _ in bad])
        return step, state, meta

    def _set_aside(self, steps):
        """Moves damaged step folders out of the manager's way (kept for inspection)."""
        if jax.process_index() == 0:
            aside = os.path.join(os.path.dirname(self.directory), "damaged_checkpoints")
            os.makedirs(aside, exist_ok=True)
            for s in steps:
                src = os.path.join(self.directory, str(s))
                if os.path.exists(src):
                    dst = os.path.join(aside, f"{s}-{time.strftime('%Y%m%d-%H%M%S')}")
                    shutil.move(src, dst)
                    log.warning("moved damaged checkpoint step %d to %s", s, dst)
        self.manager.reload()

    def wait(self):
        """Blocks until every pending save is on disk."""
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def _jsonable(x):
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        return x.item()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


# ---------------------------------------------------------------------------------------------
# Preemption


class Preemption:
    """SIGTERM (and optionally SIGINT) -> `requested` flag; the loop saves and exits.

    Handlers can only be installed from the main thread; elsewhere this is a no-op flag.
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self.requested = False
        self.signal_name = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for s in signals:
                self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def restore_handlers(self):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}
