"""Tiny random FreezeEmpath (presets.TINY) on synthetic emotional speech: tests, CI, smoke runs.

    freezeempath-jax train --config configs/tiny.py --config.stage=2a \
        --config.train.steps=300 --workdir /tmp/tiny_2a

`--config.stage=1|2a|2b|3` switches the stage; its freezing table, learning rate, batch
size, step count and objective come from `recipes` below when the trainer resolves the config
(train/defaults.py: overrides are applied after `get_config`, so stage-dependent fields stay
None here and are filled lazily). Values are scaled for a 64-wide model on a CPU: larger
learning rates and a fixed number of steps instead of the paper's epochs.

Data: the eSpeak corpus (data/synthetic.py) with 3 s clips; the frozen encoder runs once per
clip (`data.cache_encoder`). `--config.data.kind=noise` uses random features instead (no
audio rendering; for loop tests). Frozen parts stay in float32: bf16 matmuls are emulated on
CPU and only slow the tiny model down (the real configs keep bf16).
"""

from freezeempath_jax.models import presets
from freezeempath_jax.train import defaults

RECIPES = {
    "1": dict(lr=3e-3, batch_size=16, steps=200),
    "2a": dict(lr=2e-3, batch_size=16, steps=300),
    "2b": dict(lr=5e-4, batch_size=16, steps=100),
    "3a": dict(lr=3e-3, batch_size=16, steps=200),
    "3b": dict(lr=3e-4, batch_size=16, steps=100),
}


def get_config():
    config = defaults.base_config(presets.TINY, RECIPES, stage="2a")
    config.train.frozen_dtype = "float32"
    config.train.log_every = 10
    config.train.ckpt_every = 50
    config.train.eval_every = 50
    config.train.eval_batches = 4
    config.data.kind = "synthetic"
    config.data.num_per_emotion = 24
    config.data.audio_seconds = 3.0
    config.data.cache_encoder = True
    config.data.target_len = 32
    config.data.teacher_len = 64
    config.data.units_len = 64
    config.data.chat_template = "plain"
    config.data.tokenizer = "byte"
    return config
