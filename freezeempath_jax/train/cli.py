"""`freezeempath-jax train` and `launch/train.py`: absl flags with ml_collections config files
(`--config FILE --config.x.y=VALUE --workdir DIR`) around `trainer.train`."""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Optional, Sequence

import jax
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from freezeempath_jax.checkpoints.workdir import CheckpointIntegrityError, one_line
from freezeempath_jax.train import defaults, trainer
from freezeempath_jax.train import metrics as M_

log = logging.getLogger("freezeempath_jax.train")

# Exit codes of the command line (EXIT_USAGE: a bad flag or config, found before any work).
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NONFINITE = 0, 1, 2, 3


def define_flags(flag_values: Optional[flags.FlagValues] = None) -> flags.FlagValues:
    """`--config` (a config file, with `--config.a.b=value` overrides) and `--workdir`, in
    `flag_values` (absl's global FLAGS when None)."""
    fv = flags.FLAGS if flag_values is None else flag_values
    if "config" not in fv:
        config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)",
                                        flag_values=fv, lock_config=False)
    if "workdir" not in fv:
        flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs); a directory "
                                             "holding a checkpoint is resumed", flag_values=fv)
    return fv


def run_from_flags(config, workdir) -> int:
    """Runs `train` and maps the outcome to an exit code (0 also after a preemption save;
    EXIT_USAGE with one `error:` line for a config that cannot train, before any work)."""
    if config is None or not workdir:
        print("usage: train --config configs/<file>.py [--config.stage=2a "
              "--config.train.steps=N ...] --workdir DIR", file=sys.stderr)
        return EXIT_USAGE
    try:
        defaults.validate(config, workdir)
    except defaults.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # ml_collections defers a config file that failed to load to here
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        why = next((x for x in lines if x.startswith("[Errno")), lines[-1] if lines else "")
        print(f"error: cannot load the --config file: {why}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = trainer.train(config, workdir)
    except M_.NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except (CheckpointIntegrityError, FileNotFoundError) as e:  # the workdir or init paths
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    if jax.process_index() == 0:
        print(json.dumps(result, default=float))
    return EXIT_OK


def main_train(argv: Sequence[str]) -> int:
    """Entry point of `freezeempath-jax train` and `launch/train.py`: `argv[0]` is the
    program name, the rest absl flags (`--config FILE --config.x=y --workdir DIR`)."""
    # A caller's own argument list gets flags of its own, so main_train can run again in one
    # process (tests, notebooks); `launch/train.py` passes only the program name and the
    # global flags absl's app.run already parsed.
    flags_ = define_flags(flags.FlagValues() if len(argv) > 1 else None)
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(f"usage: {argv[0]} --config configs/<file>.py [--config.stage=2a "
              "--config.train.steps=N --config.<section>.<key>=VALUE ...] --workdir DIR\n\n"
              "Trains one stage; a DIR holding a checkpoint is resumed. Every field of the "
              "config file can be overridden; see configs/*.py and train/defaults.py.\n")
        print(flags_.module_help(__name__))
        return 0
    # ml_collections reads `--config.x=y` overrides from sys.argv, not from the list parsed:
    # point it at `argv` so a caller's own argument list (tests, notebooks) is what counts
    saved, sys.argv = sys.argv, list(argv)
    try:
        flags_(list(argv))
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        # unknown flags or config fields, values of the wrong type: before any work
        print(f"error: {_flag_error(e, argv)}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        sys.argv = saved
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes
    logging.basicConfig(level=logging.WARNING)
    log.setLevel(logging.INFO)
    return run_from_flags(flags_.config, flags_.workdir)


def _flag_error(e: BaseException, argv: Sequence[str]) -> str:
    """One line for a flag parsing failure. ml_collections raises AttributeError / KeyError
    (message: the quoted field name, maybe a suggestion on the next line) for a config field
    that does not exist; the line names the flag that asked for it."""
    if not isinstance(e, (AttributeError, KeyError)):
        return one_line(e).split(": ", 1)[-1] if isinstance(e, flags.Error) else one_line(e)
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(...))
        e = e.args[0]
    text = str(e.args[0] if e.args else e)
    name = re.search(r"'([^']+)'", text)
    name = name.group(1) if name else text.splitlines()[0] if text else "?"
    flag = next((a for a in argv if a.startswith("--config.")
                 and name in a.split("=", 1)[0].split(".")), None)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    return (f"{flag or '--config.' + name}: the config has no field {name!r}"
            + (f" (did you mean {hint.group(1)!r}?)" if hint else ""))
