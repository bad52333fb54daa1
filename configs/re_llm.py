"""RE-LLM-style option over the same code: the emotion extractor gets an auxiliary regression
head for dimensional attributes (arousal, valence, dominance; `num_attributes=3`) trained with
MSE next to the SER CE and the LLM's emotion statement (stage 2a), then the empathetic stage
2b. Records carry `attributes: [arousal, valence, dominance]` (scaled to [-1, 1]); on the
synthetic corpus, which has none, each emotion gets a fixed prototype point.

`--config=configs/re_llm.py` is the full-size model; `--config=configs/re_llm.py:tiny` the
tiny random model on synthetic speech.
"""

import dataclasses

from freezeempath_jax.models import presets
from freezeempath_jax.train import defaults


def get_config(size: str = "full"):
    size = size or "full"
    if size not in ("full", "tiny"):
        raise ValueError(f"configs/re_llm.py:{size}: choose 'full' or 'tiny'")
    base = presets.FREEZEEMPATH_7B if size == "full" else presets.TINY
    model = dataclasses.replace(base, emotion=dataclasses.replace(base.emotion,
                                                                  num_attributes=3))
    if size == "full":
        recipes = {k: dict(defaults.PAPER_RECIPES[k]) for k in ("2a", "2b")}
    else:
        recipes = {"2a": dict(lr=2e-3, batch_size=16, steps=300),
                   "2b": dict(lr=5e-4, batch_size=16, steps=100)}
    config = defaults.base_config(model, recipes, stage="2a")
    config.loss.attr_weight = 1.0
    config.loss.ser_weight = 0.8
    if size == "full":
        config.train.frozen_dtype = "bfloat16"
        config.train.compute_dtype = "bfloat16"
        config.train.remat_policy = "full"
        config.mesh.shape = (1, -1, 1)
        config.data.kind = "manifest"
        config.data.chat_template = "qwen"
        config.data.tokenizer = "auto"
        config.data.target_len = 128
    else:
        config.train.frozen_dtype = "float32"
        config.data.kind = "synthetic"
        config.data.audio_seconds = 3.0
        config.data.cache_encoder = True
        config.data.target_len = 32
    return config
