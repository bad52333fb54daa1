"""`freezeempath-jax train` and `launch/train.py`: absl flags with ml_collections config files
(`--config FILE --config.x.y=VALUE --workdir DIR`) around `trainer.train`."""

from __future__ import annotations

import json
import logging
import sys
from typing import Sequence

import jax
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from freezeempath_jax.train import metrics as M_
from freezeempath_jax.train import trainer

log = logging.getLogger("freezeempath_jax.train")

# Exit codes of the command line.
EXIT_OK, EXIT_NONFINITE, EXIT_ERROR = 0, 3, 1


def define_flags():
    """`--config` (a config file, with `--config.a.b=value` overrides) and `--workdir`."""
    if "config" not in flags.FLAGS:
        config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)",
                                        lock_config=False)
    if "workdir" not in flags.FLAGS:
        flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs); a directory "
                                             "holding a checkpoint is resumed")
    return flags.FLAGS


def run_from_flags(config, workdir) -> int:
    """Runs `train` and maps the outcome to an exit code (0 also after a preemption save)."""
    if config is None or not workdir:
        print("usage: train --config configs/<file>.py [--config.stage=2a "
              "--config.train.steps=N ...] --workdir DIR", file=sys.stderr)
        return 2
    try:
        result = trainer.train(config, workdir)
    except M_.NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    if jax.process_index() == 0:
        print(json.dumps(result, default=float))
    return EXIT_OK


def main_train(argv: Sequence[str]) -> int:
    """Entry point of `freezeempath-jax train` and `launch/train.py`: `argv[0]` is the
    program name, the rest absl flags (`--config FILE --config.x=y --workdir DIR`)."""
    flags_ = define_flags()
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(f"usage: {argv[0]} --config configs/<file>.py [--config.stage=2a "
              "--config.train.steps=N --config.<section>.<key>=VALUE ...] --workdir DIR\n\n"
              "Trains one stage; a DIR holding a checkpoint is resumed. Every field of the "
              "config file can be overridden; see configs/*.py and train/defaults.py.\n")
        print(flags_.module_help(__name__))
        return 0
    flags_(list(argv))
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes
    logging.basicConfig(level=logging.WARNING)
    log.setLevel(logging.INFO)
    return run_from_flags(flags_.config, flags_.workdir)
