"""BLSP-Emo recipe over the same code (DESIGN.md section 5, related recipes): a convolutional
adapter (three stride-2 Conv1d + GLU, 8x fewer frames) instead of frame concatenation;
stage 1 continuation alignment (the frozen LLM continues the transcript, the student hears the
speech: `distill_ce`, or `--config.loss.objective=distill_kl` for the KL variant); stage 2
emotion-aware continuation (the LLM continues the transcript "with a <emotion> tone", the
student hears the speech) plus the auxiliary SER loss, training the adapter and the emotion
extractor together. The same frozen LLM writes the targets (self-distillation).

Our stage names: "1" = continuation alignment, "2b" = emotion-aware continuation (no rows of the
2a naming task: loss.mix_2a = 0). BLSP-Emo's own learning rates are not in DESIGN.md; the
values below are the FreezeEmpath ones for the matching stages.

`--config=configs/blsp_emo.py` is the full-size model (Whisper-large-v3 + Qwen2.5-7B-Instruct);
`--config=configs/blsp_emo.py:tiny` the tiny random model on synthetic speech (tests).
"""

import dataclasses

from freezeempath_jax.models import presets
from freezeempath_jax.models.configs import ProjectorConfig
from freezeempath_jax.train import defaults

_ALL = "(whisper|projector|emotion|llm|speech_decoder)/.*"
ADAPTER_AND_EMOTION = (("(projector|emotion)/.*", "trainable"), (_ALL, "frozen"))


def get_config(size: str = "full"):
    size = size or "full"
    if size not in ("full", "tiny"):
        raise ValueError(f"configs/blsp_emo.py:{size}: choose 'full' or 'tiny'")
    if size == "full":
        base = presets.FREEZEEMPATH_7B
        projector = ProjectorConfig(type="conv", conv_channels=0, conv_layers=3, conv_kernel=5,
                                    conv_stride=2)
        recipes = {
            "1": dict(defaults.PAPER_RECIPES["1"]),
            "2b": dict(lr=2e-4, batch_size=128, epochs=3.0, trainable=ADAPTER_AND_EMOTION),
        }
    else:
        base = presets.TINY
        projector = ProjectorConfig(type="conv", conv_channels=32, conv_layers=3, conv_kernel=5,
                                    conv_stride=2)
        recipes = {
            "1": dict(lr=3e-3, batch_size=16, steps=200),
            "2b": dict(lr=2e-3, batch_size=16, steps=200, trainable=ADAPTER_AND_EMOTION),
        }
    model = dataclasses.replace(base, projector=projector, speech_decoder=None)
    config = defaults.base_config(model, recipes, stage="1")
    config.loss.mix_2a = 0.0
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
        config.data.teacher_len = 64
    return config
