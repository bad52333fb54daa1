"""FLOP accounting of one training step (train/flops.py) against counts written out by hand.

The hand counts below restate the model's matrix products from its config (2 FLOPs per
multiply-add) independently of the module's bookkeeping; the multipliers state the rule of
the module docstring: a frozen part that gradients flow through costs forward + input
gradient (2x in dense layers, 3x in attention, whose two operands both take gradients),
a trainable part 3x (2x for a first layer fed by the frozen encoder), a frozen part nothing
flows through 1x. Nothing here compiles or allocates: it runs in well under a second.
"""

import dataclasses

import pytest

from freezeempath_jax.models.configs import ProjectorConfig
from freezeempath_jax.models.presets import FREEZEEMPATH_7B, TINY
from freezeempath_jax.train import flops

B, T, F = 16, 112, 150  # batch, LLM positions, encoder positions (3 s clips)


def llm_dense_forward(lm, t):
    """Dense-layer FLOPs of one forward pass over t positions (LM head included)."""
    q, kv = lm.num_heads * lm.head_dim, lm.num_kv_heads * lm.head_dim
    per_layer = 2 * t * (lm.hidden_size * q + 2 * lm.hidden_size * kv + q * lm.hidden_size
                         + 3 * lm.hidden_size * lm.intermediate_size)
    return lm.num_layers * per_layer + 2 * t * lm.hidden_size * lm.vocab_size


def llm_attention_forward(lm, t):
    return lm.num_layers * 2 * (2 * t * t * lm.num_heads * lm.head_dim)


def whisper_forward(w, t):
    d = w.d_model
    convs = 2 * (2 * t) * 3 * w.n_mels * d + 2 * t * 3 * d * d
    layers = w.num_layers * (4 * 2 * t * d * d + 2 * 2 * t * d * w.mlp_dim + 2 * 2 * t * t * d)
    return convs + layers


def emotion_forward(cfg, t, heads=True):
    e, d, h, n = cfg.emotion, cfg.whisper.d_model, cfg.llm.hidden_size, cfg.whisper.num_layers
    q = e.num_queries
    out = 2 * n * d * e.gate_hidden + 2 * n * e.gate_hidden  # layer gate
    out += 2 * n * t * d  # gated sum over layers
    out += 2 * q * d * d + 2 * 2 * t * d * d + 2 * 2 * q * t * d + 2 * q * d * d  # attn pool
    out += 2 * q * d * e.mlp_hidden + 2 * q * e.mlp_hidden * h
    if heads:
        out += 2 * h * e.num_classes
    return out


def test_frozen_llm_costs_forward_plus_input_gradient():
    parts = flops.flops_breakdown(TINY, dict(stage="2a", batch_size=B), T, F,
                                  encoder_cached=True)
    fwd, total = parts["llm"]
    assert fwd == B * llm_dense_forward(TINY.llm, T)
    assert total == 2 * fwd  # forward + dx, no dW
    a_fwd, a_total = parts["llm/attention"]
    assert a_fwd == B * llm_attention_forward(TINY.llm, T)
    assert a_total == 3 * a_fwd  # forward + d(scores) into both q and k, probs and v
    # The cached encoder is not run; the frozen projector is forward only.
    assert "whisper" not in parts
    assert parts["projector"][1] == parts["projector"][0]


def test_trainable_parts_cost_three_times_forward():
    # A table that also trains the LLM (full fine-tuning): every LLM product is 3x.
    table = (("(projector|llm)/.*", "trainable"), ("(whisper|emotion|speech_decoder)/.*",
                                                  "frozen"))
    parts = flops.flops_breakdown(TINY, dict(stage="1", batch_size=B, trainable_table=table),
                                  T, F, encoder_cached=True)
    assert parts["llm"][1] == 3 * parts["llm"][0]
    assert parts["llm/attention"][1] == 3 * parts["llm/attention"][0]
    # Stage 1's projector: linear1 reads the stopped encoder output (forward + dW: 2x),
    # linear2 takes both gradients (3x).
    p, d, h = TINY.projector, TINY.whisper.d_model, TINY.llm.hidden_size
    s = F // p.k
    l1, l2 = 2 * s * p.k * d * p.hidden_dim, 2 * s * p.hidden_dim * h
    parts = flops.flops_breakdown(TINY, dict(stage="1", batch_size=B), T, F,
                                  encoder_cached=True)
    assert parts["projector"] == (B * (l1 + l2), B * (2 * l1 + 3 * l2))
    assert parts["llm"][1] == 2 * parts["llm"][0]


def test_whisper_is_forward_only_and_hand_counted():
    total_cached = flops.train_step_flops(TINY, dict(stage="2a", batch_size=B), T, F,
                                          encoder_cached=True)
    total = flops.train_step_flops(TINY, dict(stage="2a", batch_size=B), T, F)
    assert total - total_cached == B * whisper_forward(TINY.whisper, F)
    # Even a table marking the encoder trainable adds no backward: encode_audio stops
    # gradients at its outputs.
    table = (("(whisper|emotion)/.*", "trainable"), ("(projector|llm|speech_decoder)/.*",
                                                    "frozen"))
    parts = flops.flops_breakdown(TINY, dict(stage="2a", batch_size=B, trainable_table=table),
                                  T, F)
    assert parts["whisper"][1] == parts["whisper"][0]


def test_stage_2a_total_matches_the_hand_count():
    cfg = TINY
    p, d, h = cfg.projector, cfg.whisper.d_model, cfg.llm.hidden_size
    s = F // p.k
    e = cfg.emotion
    # Emotion extractor, trainable. First products read the stopped encoder states: gate_fc1
    # (forward + dW), gated sum (forward + gradient of the gate weights only), 2x; the
    # learned-query projection (input is a trainable parameter: forward + dW + dq) 3x; every
    # later product 3x.
    n = cfg.whisper.num_layers
    fc1 = 2 * n * d * e.gate_hidden
    gsum = 2 * n * F * d
    rest = emotion_forward(cfg, F) - fc1 - gsum
    emotion_total = 2 * fc1 + 2 * gsum + 3 * rest
    projector = 2 * s * p.k * d * p.hidden_dim + 2 * s * p.hidden_dim * h
    llm_total = 2 * llm_dense_forward(cfg.llm, T) + 3 * llm_attention_forward(cfg.llm, T)
    whisper = whisper_forward(cfg.whisper, F)
    expected = B * (whisper + projector + emotion_total + llm_total)
    got = flops.train_step_flops(cfg, dict(stage="2a", batch_size=B), seq_len=T,
                                 encoder_frames=F)
    assert got == pytest.approx(expected, rel=1e-12)
    # Gradient accumulation does not change the step's FLOPs.
    assert flops.train_step_flops(cfg, dict(stage="2a", batch_size=B, microbatches=4), T,
                                  F) == got


def test_ser_warm_up_counts_the_emotion_extractor_only():
    """`ser_ce` never reaches the projector or the LLM: the step is the emotion extractor
    (same count as in 2a) and, when the encoder is not cached, its forward pass."""
    tc = dict(stage="2a", objective="ser_ce", batch_size=B)
    cached = flops.flops_breakdown(TINY, tc, T, F, encoder_cached=True)
    assert sorted(cached) == ["emotion"]
    full_2a = flops.flops_breakdown(TINY, dict(stage="2a", batch_size=B), T, F,
                                    encoder_cached=True)
    assert cached["emotion"] == full_2a["emotion"]
    got = flops.train_step_flops(TINY, tc, seq_len=T, encoder_frames=F)
    assert got == pytest.approx(cached["emotion"][1] + B * whisper_forward(TINY.whisper, F),
                                rel=1e-12)


def test_stage_3_llm_forward_only_and_decoder_trained():
    with pytest.raises(ValueError, match="reply_len"):
        flops.train_step_flops(TINY, dict(stage="3a", batch_size=B), T, F)
    parts = flops.flops_breakdown(TINY, dict(stage="3a", batch_size=B), T, F, reply_len=32,
                                  units_len=64, encoder_cached=True)
    lm = TINY.llm
    head = 2 * T * lm.hidden_size * lm.vocab_size
    assert parts["llm"] == (B * (llm_dense_forward(lm, T) - head),) * 2  # no LM head, 1x
    sd = TINY.speech_decoder
    length = min(32 + 64 + 2, sd.max_length)
    proj = 2 * 32 * lm.hidden_size * sd.lm.hidden_size
    fwd = llm_dense_forward(sd.lm, length) + proj
    assert parts["speech_decoder"] == (B * fwd, B * (3 * (fwd - proj) + 2 * proj))


def test_distill_kl_adds_a_forward_only_teacher():
    base = flops.flops_breakdown(TINY, dict(stage="1", batch_size=B), T, F,
                                 encoder_cached=True)
    kl = flops.flops_breakdown(TINY, dict(stage="1", objective="distill_kl", batch_size=B), T,
                               F, teacher_seq_len=96, encoder_cached=True)
    assert "teacher" not in base
    assert kl["teacher"] == (B * llm_dense_forward(TINY.llm, 96),) * 2
    assert kl["llm"] == base["llm"]


def test_conv_adapter_and_full_size_order_of_magnitude():
    conv = dataclasses.replace(TINY, projector=ProjectorConfig(type="conv", conv_channels=32))
    parts = flops.flops_breakdown(conv, dict(stage="1", batch_size=1), T, F,
                                  encoder_cached=True)
    # 150 -> 75 -> 38 -> 19 positions; GLU halves 64 output channels to 32.
    convs = [2 * 75 * 5 * 64 * 64, 2 * 38 * 5 * 32 * 64, 2 * 19 * 5 * 32 * 64]
    proj = 2 * 19 * 32 * 64
    assert parts["projector"] == (sum(convs) + proj, 2 * convs[0] + 3 * sum(convs[1:])
                                  + 3 * proj)
    # Qwen2.5-7B + Whisper-large-v3, stage 1, 448 tokens x 128 rows, 30 s clips: the frozen
    # LLM dominates with ~2 x (2 x 7.07e9 parameters) per token; the encoder's forward
    # (~0.64e9 parameters over 1500 positions) comes second.
    total = flops.train_step_flops(FREEZEEMPATH_7B, dict(stage="1", batch_size=128), 448,
                                   1500)
    llm_params = 7.07e9
    approx = 128 * (2 * 2 * llm_params * 448 + 2 * 0.635e9 * 1500)
    assert total == pytest.approx(approx, rel=0.1)


def test_mfu_helper():
    assert flops.model_flops_utilization(1e12, 0.5, 1e12, 4) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        flops.model_flops_utilization(1e12, 0.0, 1e12)
