"""The released FreezeEmpath shape: Whisper-large-v3 encoder + Qwen2.5-7B-Instruct (both
frozen, bf16) + frame-concat projector, emotion extractor and a Qwen2.5-0.5B speech decoder.

    freezeempath-jax train --config configs/freezeempath_7b.py --config.stage=1 \
        --config.init.whisper=/ckpt/whisper-large-v3 \
        --config.init.llm=/ckpt/Qwen2.5-7B-Instruct \
        --config.data.train=/data/instructs2s_train.jsonl --workdir /runs/stage1
    ... --config.stage=2a --config.init.previous="('/runs/stage1',)" ...

Recipe (DESIGN.md section 5; epochs become steps once the manifest size is known):
    stage 1   projector          1 epoch  batch 128  lr 1e-3
    stage 2a  emotion extractor  3 epochs batch 128  lr 2e-4  (CE + 0.8 x SER CE)
    stage 2b  emotion extractor  1 epoch  batch 128  lr 5e-6  (mixed with 2a rows)
    stage 3a  speech decoder     5 epochs batch 32   lr 5e-4  (units from an emotional TTS)
    stage 3b  speech decoder     1 epoch* batch 32   lr 1e-5  (*not published)
All with 3% warmup and cosine decay. Parameters are sharded FSDP-style over every device
(mesh (1, -1, 1): data 1, fsdp = all, tensor 1); frozen parts are bf16, compute is bf16,
every block is rematerialised in the backward pass through the frozen LLM.
Stage-dependent fields are resolved lazily from `recipes` (train/defaults.py).
"""

from freezeempath_jax.models import presets
from freezeempath_jax.train import defaults


def get_config():
    config = defaults.base_config(presets.FREEZEEMPATH_7B, defaults.PAPER_RECIPES, stage="1")
    t = config.train
    t.frozen_dtype = "bfloat16"
    t.compute_dtype = "bfloat16"
    t.remat_policy = "full"
    t.log_every = 20
    t.ckpt_every = 500
    t.eval_every = 500
    t.eval_batches = 8
    t.keep = 3
    config.mesh.shape = (1, -1, 1)
    d = config.data
    d.kind = "manifest"
    d.audio_seconds = 30.0  # the release pads every clip to 30 s (1500 frames, 300 tokens)
    d.cache_encoder = False
    d.chat_template = "qwen"
    d.tokenizer = "auto"  # the tokenizer of init.llm / init.freezeempath
    d.target_len = 128
    d.teacher_len = 256
    d.units_len = 1024
    return config
