"""The word-timed content-alignment warm-up (`align_words`): eSpeak's word events give each
clip's word timings, and each speech position regresses onto the frozen LLM's embedding of
the token spoken at its centre; no LLM layer runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from freezeempath_jax.data import synthetic
from freezeempath_jax.models import presets
from freezeempath_jax.text.tokenizers import make_tokenizer
from freezeempath_jax.train import losses
from freezeempath_jax.train.batches import BatchBuilder


def test_synthesize_reports_word_timings_without_changing_the_audio():
    text = "How do I bake bread?"
    audio, words = synthetic.synthesize(text, "sad", voice="en-us+m3", seed=3, with_words=True)
    np.testing.assert_array_equal(audio, synthetic.synthesize(text, "sad", voice="en-us+m3",
                                                              seed=3))
    assert [w[0] for w in words] == ["How", "do", "I", "bake", "bread"]
    starts = [w[1] for w in words]
    assert starts == sorted(starts) and starts[0] >= synthetic.SILENCE_SECONDS[0] - 1e-3
    assert all(w[2] >= w[1] for w in words)
    assert words[-1][2] <= len(audio) / synthetic.SAMPLING_RATE
    # the sad preset is slower: the same words take longer than in the happy one
    _, happy = synthetic.synthesize(text, "happy", voice="en-us+m3", seed=3, with_words=True)
    assert words[-1][2] - words[0][1] > happy[-1][2] - happy[0][1]


def test_word_timings_cover_the_speech():
    """The words' span lies where the clip is loud (eSpeak's events are on the clip's time
    line, after the leading silence)."""
    audio, words = synthetic.synthesize("Teach me to plant roses.", "neutral", seed=1,
                                        noise=False, with_words=True)
    loud = np.flatnonzero(np.abs(audio) > 0.02) / synthetic.SAMPLING_RATE
    assert abs(loud[0] - words[0][1]) < 0.08
    assert abs(loud[-1] - words[-1][2]) < 0.25


def _builder(num_speech=10, frames=50):
    tok = make_tokenizer(presets.TINY)
    b = BatchBuilder(presets.TINY, "1", "align_words", tok, num_speech)
    b.encoder_frames = frames  # 50 frames of 20 ms = 1 s; 10 positions of 0.1 s
    b.silence_text = ""  # silent positions: -1 (the zero vector)
    return b, tok


def test_position_tokens_follow_the_word_timings():
    b, tok = _builder()
    rec = {"id": "r", "words": [["ab", 0.0, 0.2], ["c", 0.5, 0.9]]}
    got = b.position_tokens(rec)
    a_, b_ = tok.encode("ab")  # two byte tokens share the first word's 0.2 s
    (c_,) = tok.encode(" c")[-1:]
    space = tok.encode(" c")[0]
    # centres 0.05, 0.15 | 0.25..0.45 silent | 0.55 0.65 (space) 0.75 0.85 (c) | 0.95 silent
    np.testing.assert_array_equal(got, [a_, b_, -1, -1, -1, space, space, c_, c_, -1])
    b.silence_text = "\n"  # silent positions: the newline token
    nl = tok.encode("\n")[-1]
    np.testing.assert_array_equal(b.position_tokens(rec), np.where(got < 0, nl, got))
    batch = b._word_positions([rec, None])
    assert batch["position_tokens"].shape == (2, 10)
    np.testing.assert_array_equal(batch["position_mask"], [[1.0] * 10, [0.0] * 10])


def test_position_tokens_errors_name_the_record():
    b, _ = _builder()
    with pytest.raises(ValueError, match="record x: objective align_words needs word timings"):
        b.position_tokens({"id": "x", "transcript": "hi"})
    with pytest.raises(ValueError, match=r"record y: word 1 is \['b'\]"):
        b.position_tokens({"id": "y", "words": [["a", 0, 0.1], ["b"]]})


def test_align_words_loss_and_accuracy():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(12, 4)).astype(np.float32)
    tok = np.array([[3, 3, -1, 5], [7, -1, -1, 2]], np.int32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.float32)  # last position is padding
    target = np.where((tok >= 0)[..., None], table[np.maximum(tok, 0)], 0.0)
    batch = {"position_tokens": tok, "position_mask": mask}
    _, sums = losses.align_words(jnp.asarray(target), jnp.asarray(table), batch)
    assert float(sums["align_word_hits"]) == float(sums["align_word_positions"]) == 4.0
    assert float(sums["align_positions"]) == 7.0
    # reference, written out: per position CE over [0-vector, table rows] on the scaled
    # negative squared distances, plus the scaled squared error to the target
    h = target + rng.normal(size=target.shape).astype(np.float32)
    scale = np.mean(np.sum(table ** 2, -1))
    cand = np.concatenate([np.zeros((1, 4)), table])
    logits = -((h[:, :, None, :] - cand[None, None]) ** 2).sum(-1) / (0.05 * scale)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                              keepdims=True)) \
        - logits.max(-1, keepdims=True)
    cls = np.where(tok >= 0, tok + 1, 0)
    ce = -np.take_along_axis(logp, cls[..., None], -1)[..., 0]
    err = ((h - target) ** 2).sum(-1) / scale
    ref = ((ce + err) * mask).sum() / mask.sum()
    loss, sums = losses.align_words(jnp.asarray(h), jnp.asarray(table), batch)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-4)
    # candidates restricted to a sub-vocabulary (a token outside it: error term only)
    vocab = np.array([3, 5, 9, 11], np.int32)  # token 7 is not a candidate
    sub = dict(batch, align_vocab=np.broadcast_to(vocab, (2, 4)))
    _, s2 = losses.align_words(jnp.asarray(target), jnp.asarray(table), sub)
    assert float(s2["align_word_positions"]) == 3.0 and float(s2["align_word_hits"]) == 3.0
    m = losses.finalize_metrics(sums)
    assert set(m) >= {"loss_align_words", "align_accuracy"}


def test_align_words_pulls_free_positions_onto_the_token_embeddings():
    rng = np.random.default_rng(1)
    table = jnp.asarray(rng.normal(size=(20, 8)).astype(np.float32))
    tok = rng.integers(0, 20, (2, 6)).astype(np.int32)
    tok[:, 0] = -1
    batch = {"position_tokens": tok, "position_mask": np.ones((2, 6), np.float32)}
    import optax

    f = jax.jit(jax.value_and_grad(lambda x: losses.align_words(x, table, batch)[0]))
    x = jnp.asarray(rng.normal(size=(2, 6, 8)).astype(np.float32))
    opt = optax.adam(0.05)
    st = opt.init(x)
    first = float(f(x)[0])
    for _ in range(300):
        loss, g = f(x)
        u, st = opt.update(g, st)
        x = optax.apply_updates(x, u)
    assert float(loss) < 1e-2 * first
    metrics = losses.finalize_metrics(losses.align_words(x, table, batch)[1])
    assert float(metrics["align_accuracy"]) == 1.0


def test_align_words_trains_only_the_projector_without_the_llm():
    from flax import linen as nn

    from freezeempath_jax import sharding
    from freezeempath_jax.checkpoints.model_tree import abstract_boxed_params, host_random_params
    from freezeempath_jax.train import flops
    from freezeempath_jax.train.step import example_batch, make_train_step

    cfg = presets.TINY
    tc = {"stage": "1", "objective": "align_words", "batch_size": 4, "steps": 3,
          "learning_rate": 1e-2, "frozen_dtype": "float32"}
    ts = make_train_step(cfg, tc, sharding.make_mesh((1, 1, 1)))
    params = host_random_params(nn.meta.unbox(abstract_boxed_params(cfg)))
    state, frozen = ts.from_params(params)
    batch = example_batch(cfg, "align_words", 4, mel_frames=80, reply_len=4)
    keep = ("mel", "position_tokens", "position_mask")
    state2, m = ts.step(state, frozen, {k: v for k, v in batch.items() if k in keep})
    assert list(state2.params) == ["projector"]
    assert np.isfinite(float(m["loss"])) and "loss_align_words" in m and "align_accuracy" in m
    parts = flops.flops_breakdown(cfg, tc, seq_len=8, encoder_frames=40)
    assert "llm" not in parts and "projector" in parts


def test_snap_to_vocab_gives_the_nearest_token_embeddings_with_a_straight_through_gradient():
    import dataclasses

    from flax import linen as nn

    from freezeempath_jax.checkpoints.model_tree import abstract_boxed_params, host_random_params
    from freezeempath_jax.models.freezeempath import FreezeEmpath, snap_to_vocab

    cfg = presets.TINY
    snapped = dataclasses.replace(cfg, projector=dataclasses.replace(cfg.projector,
                                                                     snap_to_vocab=True))
    params = host_random_params(nn.meta.unbox(abstract_boxed_params(cfg)))
    mel = jnp.asarray(np.random.default_rng(0).normal(
        size=(2, cfg.whisper.n_mels, 2 * cfg.whisper.max_source_positions)), jnp.float32)
    plain = np.asarray(FreezeEmpath(cfg).apply({"params": params}, mel,
                                               method=FreezeEmpath.encode_speech)[0])
    snap = np.asarray(FreezeEmpath(snapped).apply({"params": params}, mel,
                                                  method=FreezeEmpath.encode_speech)[0])
    table = np.asarray(params["llm"]["embed_tokens"]["embedding"])
    nearest = ((plain[:, :, None] - table[None, None]) ** 2).sum(-1).argmin(-1)
    np.testing.assert_allclose(snap, table[nearest], atol=1e-6)
    assert len(np.unique(nearest)) > 1
    # the projector alone (what the alignment warm-ups train) stays continuous
    last = FreezeEmpath(snapped).apply({"params": params}, mel,
                                       method=FreezeEmpath.encode_audio)[0]
    proj = FreezeEmpath(snapped).apply({"params": params}, last,
                                       method=FreezeEmpath.project_speech)
    np.testing.assert_allclose(np.asarray(proj), plain, atol=1e-5)
    g = jax.grad(lambda x: jnp.sum(snap_to_vocab(x, jnp.asarray(table)) * 3.0))(
        jnp.asarray(plain))
    np.testing.assert_allclose(np.asarray(g), 3.0)
