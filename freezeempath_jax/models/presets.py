"""Model presets: the released FreezeEmpath shapes, the small real demo model, a tiny test model.

Config files in `configs/` start from these and add training/data settings.
"""

import dataclasses

from freezeempath_jax.models.configs import (EmotionConfig, FreezeEmpathConfig, LMConfig,
                                             ProjectorConfig, SpeechDecoderConfig, WhisperConfig)

WHISPER_LARGE_V3 = WhisperConfig(n_mels=128, d_model=1280, num_layers=32, num_heads=20,
                                 mlp_dim=5120)
WHISPER_TINY_EN = WhisperConfig(n_mels=80, d_model=384, num_layers=4, num_heads=6, mlp_dim=1536)

QWEN25_7B_INSTRUCT = LMConfig(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
    num_kv_heads=4, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6, qkv_bias=True,
    tie_embeddings=False, max_position_embeddings=32768)
QWEN25_05B = LMConfig(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
    num_kv_heads=2, head_dim=64, rope_theta=1e6, rms_norm_eps=1e-6, qkv_bias=True,
    tie_embeddings=True, max_position_embeddings=32768)
SMOLLM2_135M_INSTRUCT = LMConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
    num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5, qkv_bias=False,
    tie_embeddings=True, max_position_embeddings=8192)

# Released model. Speech-decoder vocabulary = Qwen vocab + <sep> + 8192 units; the ids below are
# the layout this project assumes and are overwritten from the release config.json on load.
_QWEN_VOCAB = 151936
FREEZEEMPATH_7B = FreezeEmpathConfig(
    whisper=WHISPER_LARGE_V3,
    projector=ProjectorConfig(type="linear", k=5, hidden_dim=2048),
    emotion=EmotionConfig(gate_hidden=128, num_heads=4, num_queries=1, mlp_hidden=2048),
    llm=QWEN25_7B_INSTRUCT,
    speech_decoder=SpeechDecoderConfig(
        lm=dataclasses.replace(QWEN25_05B, vocab_size=_QWEN_VOCAB + 1 + 8192),
        proj_type="linear", ffn_dim=4096, add_token_embeddings=True, gate_fusion=False,
        stream_n=3, stream_m=15, unit_vocab_size=8192, sep_token_id=_QWEN_VOCAB,
        unit_offset=_QWEN_VOCAB + 1, eos_token_id=151645, max_length=2048, max_units=1024),
    # <speech> and <emotion> appended after Qwen's 151665 tokens (inside the padded vocab).
    speech_token_id=151665, emotion_token_id=151666, dtype="bfloat16")

# Small real model for the CPU demo: Whisper tiny.en + SmolLM2-135M-Instruct (frozen), no
# speech decoder. Placeholders sit past the vocabulary; they are never embedded.
DEMO_SMALL = FreezeEmpathConfig(
    whisper=WHISPER_TINY_EN,
    projector=ProjectorConfig(type="linear", k=5, hidden_dim=1024),
    emotion=EmotionConfig(gate_hidden=64, num_heads=4, num_queries=1, mlp_hidden=512),
    llm=SMOLLM2_135M_INSTRUCT, speech_decoder=None,
    speech_token_id=49152, emotion_token_id=49153, dtype="float32")

# Tiny random model for tests (every part present).
TINY = FreezeEmpathConfig(
    whisper=WhisperConfig(n_mels=80, d_model=64, num_layers=2, num_heads=4, mlp_dim=128,
                          max_source_positions=1500, allow_short_inputs=True),
    projector=ProjectorConfig(type="linear", k=5, hidden_dim=64),
    emotion=EmotionConfig(gate_hidden=16, num_heads=4, num_queries=1, mlp_hidden=64),
    llm=LMConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, rope_theta=10000.0),
    speech_decoder=SpeechDecoderConfig(
        lm=LMConfig(vocab_size=384 + 1 + 32, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=True),
        proj_type="linear", stream_n=3, stream_m=5, unit_vocab_size=32, sep_token_id=384,
        unit_offset=385, eos_token_id=2, max_length=256, max_units=64),
    speech_token_id=3, emotion_token_id=4, dtype="float32")


def demo_speech_decoder(unit_vocab_size: int = 512, max_units: int = 600) -> SpeechDecoderConfig:
    """The CPU demo's speech decoder (stage 3): a 4-layer, 256-wide causal LM over the demo
    codec's units (`models.unit_codec`). It reads SmolLM2's projected hidden states only (no
    text-token embeddings, so its vocabulary is just the units, `<sep>` and EOS):
    ids 0..K-1 units, K `<sep>`, K+1 EOS. Stage 3 trains it on aligned chunks
    (`models.streaming`), so M is a cap: 75 units (1.5 s) hold the speech of 3 tokens even in
    the slow sad style (measured 30-60 units; longer chunks carry over to the next)."""
    k = int(unit_vocab_size)
    return SpeechDecoderConfig(
        lm=LMConfig(vocab_size=k + 2, hidden_size=256, intermediate_size=768, num_layers=4,
                    num_heads=4, num_kv_heads=2, head_dim=64, rope_theta=10000.0,
                    qkv_bias=False, tie_embeddings=True, max_position_embeddings=1024),
        proj_type="linear", add_token_embeddings=False, stream_n=3, stream_m=75,
        unit_vocab_size=k, sep_token_id=k, unit_offset=0, eos_token_id=k + 1,
        max_length=1024, max_units=max_units)
