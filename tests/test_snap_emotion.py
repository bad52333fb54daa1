"""The emotion read as words (`emotion.snap_phrases`): the recognised class's phrase takes the
emotion slots (an empty phrase leaves holes), the frozen LLM then computes exactly what it
computes for that phrase typed as text - in training's masked prefill and in chat, where a
row gets only its phrase's placeholders."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from freezeempath_jax.checkpoints.model_tree import abstract_boxed_params, host_random_params
from freezeempath_jax.models import configs
from freezeempath_jax.models.freezeempath import FreezeEmpath, phrase_table, snap_emotion
from freezeempath_jax.text.padding import left_pad
from test_snap_compact import CFG, chat_two_clips, greedy_reference


def test_snap_emotion_picks_the_argmax_phrase_with_no_gradient():
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(30, 4)), jnp.float32)
    phrases = ((3, 4), (5,), (), (6, 7, 8))
    logits = jnp.asarray([[0.1, 2.0, 0.0, -1.0], [0.0, 0.0, 3.0, 0.5], [1.0, 0.0, 0.0, 4.0]])
    emb, keep = snap_emotion(logits, table, phrases)
    ids, _ = phrase_table(phrases)
    np.testing.assert_array_equal(ids, [[0, 3, 4], [0, 0, 5], [0, 0, 0], [6, 7, 8]])
    np.testing.assert_array_equal(np.asarray(keep), [[0, 0, 1], [0, 0, 0], [1, 1, 1]])
    t = np.asarray(table)
    np.testing.assert_allclose(np.asarray(emb[0]), [np.zeros(4), np.zeros(4), t[5]])
    np.testing.assert_allclose(np.asarray(emb[1]), np.zeros((3, 4)))
    np.testing.assert_allclose(np.asarray(emb[2]), t[[6, 7, 8]], rtol=1e-6)
    # a discrete choice: nothing flows back to the logits (nor into the frozen table)
    g = jnp.asarray(rng.normal(size=emb.shape), jnp.float32)
    d_logits, d_table = jax.grad(lambda x, w: jnp.sum(snap_emotion(x, w, phrases)[0] * g),
                                 argnums=(0, 1))(logits, table)
    assert not np.any(np.asarray(d_logits)) and not np.any(np.asarray(d_table))


def _setup():
    """A tiny random model whose two clips are recognised as different classes; the first
    class reads a 3-token phrase, the second nothing, the others 1-2 tokens."""
    params = host_random_params(nn.meta.unbox(abstract_boxed_params(CFG)))
    frames = 2 * CFG.whisper.max_source_positions
    noise = np.random.default_rng(0).normal(size=(CFG.whisper.n_mels, frames))
    # a noise clip and a silent one: the random SER head tells these two apart
    mel = jnp.asarray(np.stack([noise, np.zeros_like(noise)]), jnp.float32)
    ser = FreezeEmpath(CFG).apply({"params": params}, mel, method=FreezeEmpath.encode_speech)[2]
    cls = [int(c) for c in np.argmax(np.asarray(ser), -1)]
    assert cls[0] != cls[1], "the test needs two clips of different classes"
    phrases = [tuple(range(40 + 5 * c, 42 + 5 * c - c % 2)) for c in range(5)]
    phrases[cls[0]], phrases[cls[1]] = (31, 32, 33), ()
    cfg = dataclasses.replace(CFG, emotion=dataclasses.replace(
        CFG.emotion, snap_phrases=tuple(phrases)))
    return cfg, params, mel, [list(phrases[c]) for c in cls]


def test_snapped_emotion_is_read_exactly_as_its_phrase_typed():
    """The masked prefill (training's forward) gives, at the last position, the logits of
    the LLM reading the prompt with the phrase as text (the second row's empty phrase: no
    text at all); the speech stays continuous here and is spliced in both."""
    cfg, params, mel, said = _setup()
    s, e = cfg.speech_token_id, cfg.emotion_token_id
    speech = FreezeEmpath(cfg).apply({"params": params}, mel,
                                     method=FreezeEmpath.encode_speech)[0]
    n_s, q = speech.shape[1], cfg.emotion.num_tokens
    assert q == 3
    head, tail = [11, 12], [21, 22, 23]
    rows = [[7] + head + [s] * n_s + [e] * q + tail, head + [s] * n_s + [e] * q + tail]
    ids, mask = left_pad(rows, 0, max(len(r) for r in rows))
    out = FreezeEmpath(cfg).apply({"params": params}, mel=mel, input_ids=jnp.asarray(ids),
                                  attention_mask=jnp.asarray(mask))
    text_rows = [[7] + head + [s] * n_s + said[0] + tail, head + [s] * n_s + said[1] + tail]
    t_ids, t_mask = left_pad(text_rows, 0, max(len(r) for r in text_rows))
    model = FreezeEmpath(cfg)
    emb = model.apply({"params": params}, jnp.asarray(t_ids),
                      model.apply({"params": params}, mel,
                                  method=FreezeEmpath.encode_features),
                      method=FreezeEmpath.prompt_embeds)
    ref = model.apply({"params": params}, inputs_embeds=emb, attention_mask=jnp.asarray(t_mask),
                      method=FreezeEmpath.llm_forward)
    np.testing.assert_allclose(np.asarray(out.logits[:, -1]), np.asarray(ref.logits[:, -1]),
                               rtol=1e-4, atol=1e-4)
    # the continuous embedding in the same slots gives other logits
    plain = FreezeEmpath(CFG).apply({"params": params}, mel=mel, input_ids=jnp.asarray(ids),
                                    attention_mask=jnp.asarray(mask))
    assert not np.allclose(np.asarray(plain.logits[:, -1]), np.asarray(ref.logits[:, -1]),
                           atol=1e-3)


def test_chat_with_snapped_emotion_answers_as_if_the_phrase_were_typed():
    """`respond` gives each row only its phrase's placeholders (none for an empty phrase) and
    its greedy reply equals generation from the prompt with the phrase as text; the
    conversation keeps that many emotion embeddings, and a second turn runs."""
    cfg, params, mel, said = _setup()
    cm, mels, convs, replies, enc = chat_two_clips(cfg, params, mel)
    assert [len(enc.row_emotion(i)) for i in range(2)] == [3, 0]
    rows = []
    for phrase in said:
        it = iter(phrase)
        ids = cm.prompt_ids([], enc.speech.shape[1], len(phrase))
        rows.append([next(it) if t == cfg.emotion_token_id else t for t in ids])
    ref = greedy_reference(cm, rows, enc.speech, jnp.zeros((2, 1, cfg.llm.hidden_size)))
    for i, r in enumerate(replies):
        assert r.text_ids == ref[i]
        assert convs[i].turns[-1].emotion_embedding.shape[0] == len(said[i])
    again = cm.respond(mels, convs, max_new_tokens=4, temperature=0.0, speech=False)
    assert len(again) == 2 and all(len(c.turns) == 2 for c in convs)


def test_snap_phrases_are_checked_and_survive_the_config_round_trip():
    cfg, params, mel, _ = _setup()
    back = configs.from_dict(configs.FreezeEmpathConfig, configs.to_dict(cfg))
    assert back == cfg and hash(back) == hash(cfg)
    bad = dataclasses.replace(cfg, emotion=dataclasses.replace(
        cfg.emotion, snap_phrases=cfg.emotion.snap_phrases[:3]))
    with pytest.raises(ValueError, match="3 phrases for 5 classes"):
        FreezeEmpath(bad).apply({"params": params}, mel, method=FreezeEmpath.encode_features)
