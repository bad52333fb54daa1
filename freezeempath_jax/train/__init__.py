"""Training core: state, optimizer, losses, the sharded step and FLOP accounting.

The loop (checkpointing, logging, launch) builds on `make_train_step`.
"""

from freezeempath_jax.train.losses import finalize_metrics, next_token_targets
from freezeempath_jax.train.optimizer import make_optimizer, make_schedule
from freezeempath_jax.train.state import TrainState
from freezeempath_jax.train.step import (TrainConfig, TrainStep, make_eval_step, make_train_step,
                                         maybe_initialize_distributed)

__all__ = [
    "TrainConfig", "TrainState", "TrainStep", "finalize_metrics", "make_eval_step", "make_optimizer", "make_schedule", "make_train_step",
    "maybe_initialize_distributed", "next_token_targets",
]
