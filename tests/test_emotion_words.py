"""The emotion-word warm-up (`loss.emotion_word_weight`): in the SER-only stage the emotion
embedding also regresses onto the frozen LLM's embedding of a word for the clip's emotion, so
the LLM reads "(I feel <emotion>.)" much as "(I feel sad.)"; no LLM layer runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from freezeempath_jax.models import presets
from freezeempath_jax.sharding import make_mesh
from freezeempath_jax.train import losses
from freezeempath_jax.train.step import TrainConfig, example_batch, make_train_step

MEL_FRAMES = 60


def test_emotion_word_sums_match_numpy_and_skip_unlabelled_rows():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(30, 6)).astype(np.float32)
    words = (4, 9, 17)
    emb = rng.normal(size=(3, 1, 6)).astype(np.float32)
    emb[1, 0] = table[9] + 0.01  # row 1 sits on its word
    labels = np.array([2, 1, -1])
    s = losses.emotion_word_sums(jnp.asarray(emb), jnp.asarray(table), jnp.asarray(labels),
                                 words)
    scale = np.mean((table[list(words)] ** 2).sum(-1))
    err = [((emb[i, 0] - table[words[labels[i]]]) ** 2).sum() / scale for i in (0, 1)]
    np.testing.assert_allclose(float(s["emotion_word_sum"]), sum(err), rtol=1e-5)
    assert float(s["emotion_word_examples"]) == 2
    nearest0 = int(np.argmin(((emb[0, 0] - table[list(words)]) ** 2).sum(-1)))
    assert float(s["emotion_word_correct"]) == 1 + (nearest0 == 2)
    m = losses.finalize_metrics(s)
    assert {"loss_emotion_word", "emotion_word_accuracy"} <= set(m)


def test_weight_zero_adds_nothing_and_missing_ids_are_an_error():
    batch = {"emotion_label": jnp.array([0, 1])}
    emb, table = jnp.zeros((2, 1, 4)), jnp.ones((8, 4))
    loss, s = losses.with_emotion_words(jnp.float32(1.0), {}, emb, table, batch, None, 0.0, ())
    assert float(loss) == 1.0 and s == {}
    with pytest.raises(ValueError, match="emotion_word_ids"):
        losses.with_emotion_words(jnp.float32(1.0), {}, emb, table, batch, None, 1.0, ())


def test_ser_stage_pulls_the_emotion_embedding_onto_the_words():
    """The `ser_ce` step with the weight trains the emotion embedding towards the words (the
    LLM-facing MLP gets gradient now) and reports the nearest-word accuracy; the frozen
    embedding table is untouched."""
    model = presets.TINY
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    words = (10, 11, 12, 13, 14)
    cfg = TrainConfig.from_dict(dict(stage="2a", objective="ser_ce", steps=20,
                                     learning_rate=3e-3, frozen_dtype="float32",
                                     emotion_word_weight=1.0, emotion_word_ids=list(words)))
    assert cfg.emotion_word_ids == words
    ts = make_train_step(model, cfg, mesh)
    state, frozen = ts.init(jax.random.key(0))
    table_before = np.asarray(frozen["llm"]["embed_tokens"]["embedding"])
    batch = example_batch(model, "ser_ce", 4, mel_frames=MEL_FRAMES, seed=3)
    first = None
    for _ in range(15):
        state, m = ts.step(state, frozen, batch)
        first = first if first is not None else float(m["loss_emotion_word"])
    assert float(m["loss_emotion_word"]) < 0.5 * first
    assert "emotion_word_accuracy" in m
    np.testing.assert_array_equal(np.asarray(frozen["llm"]["embed_tokens"]["embedding"]),
                                  table_before)
