"""OSUM-EChat recipe over the same code (DESIGN.md section 5, related recipes), in this
project's frozen-LLM setting:

- Paralinguistic perception beyond emotion: the emotion extractor's pooled vector also feeds
  a speaker-gender head (female / male) and an age-group head (young / middle-aged / older),
  each trained with its own CE weight (`loss.gender_weight`, `loss.age_weight`) next to the
  SER CE and the LLM's emotion statement (stage 2a, and the cheap SER-only warm-up with
  `--config.loss.objective=ser_ce`). Records carry `gender` / `age_group`: the CREMA-D builder
  reads both from the corpus's VideoDemographics.csv, IEMOCAP gives gender (the utterance
  name), the synthetic corpus gives gender (its eSpeak voice) and no age, so the tiny and
  small configs train no age head. `--config.model.emotion.splice_cues=True` also splices one
  embedding per head (class probabilities x a learned table) after the emotion embedding.
- Linguistic-paralinguistic dual thinking (`data.dual_thinking`, stage 2b): the assistant turn
  opens with a short analysis, "(The user sounds like a woman, and sad.)", written from the
  labels in training and from the heads' predictions in chat; the frozen LLM writes the
  target reply after it (self-distillation), and the student learns that reply with the
  analysis in its prompt. `chat --dual-thinking on|off` overrides the checkpoint's default.

`--config=configs/osum_echat.py` is the full-size model (Whisper-large-v3 +
Qwen2.5-7B-Instruct); `:tiny` the tiny random model on synthetic speech (tests); `:small` the
CPU demo's real small models (Whisper tiny.en + SmolLM2-135M-Instruct, `demo.demo_config`)
on the demo's synthetic corpus:

    freezeempath-jax train --config configs/osum_echat.py:small --config.stage=2a \
        --config.loss.objective=ser_ce --workdir /tmp/osum_ser
"""

import dataclasses

from freezeempath_jax.models import presets
from freezeempath_jax.models.configs import (AGE_GROUPS, GENDERS, FreezeEmpathConfig,
                                             from_dict, to_dict)
from freezeempath_jax.train import defaults

SIZES = ("full", "tiny", "small")
# Weights of the paralinguistic heads' CE (OSUM-EChat does not publish its own; the SER head's
# 0.8 is the reference scale).
GENDER_WEIGHT = 0.8
AGE_WEIGHT = 0.8


def _with_heads(model, age: bool):
    emotion = dataclasses.replace(model.emotion, num_genders=len(GENDERS),
                                  num_age_groups=len(AGE_GROUPS) if age else 0)
    return dataclasses.replace(model, emotion=emotion)


def get_config(size: str = "full"):
    size = size or "full"
    if size not in SIZES:
        raise ValueError(f"configs/osum_echat.py:{size}: choose one of {', '.join(SIZES)}")
    if size == "small":
        from freezeempath_jax import demo  # the CPU demo's recipe, the single source of it

        config = demo.demo_config("2a")
        model = _with_heads(from_dict(FreezeEmpathConfig, config.model), age=False)
        # this recipe trains stage 1 through the LLM (the paper's order); the demo's snapped
        # speech needs its word-timed "align" stage first, so the projector stays continuous
        model = dataclasses.replace(model, projector=dataclasses.replace(
            model.projector, snap_to_vocab=False, snap_compact=False))
        config.model = to_dict(model)
        config.loss.gender_weight = demo.SER_WEIGHT  # as the demo weighs its SER head
        config.loss.age_weight = 0.0
        config.data.dual_thinking = True
        return config
    if size == "full":
        model = _with_heads(presets.FREEZEEMPATH_7B, age=True)
        recipes = {k: dict(defaults.PAPER_RECIPES[k]) for k in ("1", "2a", "2b")}
    else:
        model = _with_heads(presets.TINY, age=False)
        recipes = {"1": dict(lr=3e-3, batch_size=16, steps=200),
                   "2a": dict(lr=2e-3, batch_size=16, steps=300),
                   "2b": dict(lr=5e-4, batch_size=16, steps=100)}
    config = defaults.base_config(model, recipes, stage="2a")
    config.loss.ser_weight = 0.8
    config.loss.gender_weight = GENDER_WEIGHT
    config.loss.age_weight = AGE_WEIGHT if size == "full" else 0.0
    config.data.dual_thinking = True
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
        config.train.log_every = 10
        config.train.eval_every = 50
        config.train.ckpt_every = 50
        config.data.kind = "synthetic"
        config.data.audio_seconds = 3.0
        config.data.cache_encoder = True
        config.data.target_len = 32
        config.data.teacher_len = 64
    return config
