"""Snapped speech read as text (`projector.snap_compact`): repeats and silence are dropped,
the kept tokens move next to the text after `<speech>`, and the frozen LLM then computes
exactly what it computes for those tokens written as text - in training's masked prefill
and in chat, where only the kept positions get placeholders."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from freezeempath_jax import inference as chat
from freezeempath_jax.checkpoints.model_tree import abstract_boxed_params, host_random_params
from freezeempath_jax.inference import sampling as sampling_lib
from freezeempath_jax.models import presets
from freezeempath_jax.models.freezeempath import (FreezeEmpath, compact_tokens, nearest_tokens,
                                                  placeholder_attention_mask)
from freezeempath_jax.text import ByteTokenizer
from freezeempath_jax.text.padding import left_pad

CFG = presets.TINY
SECONDS = 3.0


def test_compact_tokens_keeps_the_first_of_each_run_and_drops_silence():
    ids = jnp.asarray([[5, 5, 9, 7, 7, 9, 7, 3], [9, 9, 9, 9, 9, 9, 9, 9]])
    speech = jnp.arange(2 * 8 * 2, dtype=jnp.float32).reshape(2, 8, 2)
    out, out_ids, keep = compact_tokens(speech, ids, silence_id=9)
    np.testing.assert_array_equal(np.asarray(keep[0]), [0, 0, 0, 0, 0, 1, 1, 1])
    # kept: position 0 (5), 3 (7; the 7 after the pause is the same word), 7 (3), in order,
    # at the end of the row
    np.testing.assert_array_equal(np.asarray(out[0, 5:]), np.asarray(speech[0, [0, 3, 7]]))
    np.testing.assert_array_equal(np.asarray(out_ids[0, 5:]), [5, 7, 3])
    assert not np.asarray(keep[1]).any()  # all silence: nothing kept
    # every position still appears once (a permutation: nothing lost, shapes static)
    np.testing.assert_array_equal(np.sort(np.asarray(out[0, :, 0])),
                                  np.asarray(speech[0, :, 0]))
    # without a silence id only repeats go (9 separates the two runs of 7)
    _, _, keep = compact_tokens(speech, ids, silence_id=-1)
    assert int(keep[0].sum()) == 6 and int(keep[1].sum()) == 1
    # unsure positions are dropped and, like silence, do not separate repeats
    sure = jnp.asarray([[1, 1, 1, 1, 0, 1, 1, 0], [1] * 8], bool)
    _, _, keep = compact_tokens(speech, ids, silence_id=9, sure=sure)
    assert int(keep[0].sum()) == 2  # 5, 7 (the final 3 is unsure)


def test_placeholder_attention_mask_punches_holes_only_at_dropped_speech_slots():
    s = CFG.speech_token_id
    ids = jnp.asarray([[0, 1, s, s, s, 2], [1, 2, s, s, s, 3]])
    attn = jnp.asarray([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    keep = jnp.asarray([[False, True, True], [False, False, True]])
    np.testing.assert_array_equal(np.asarray(placeholder_attention_mask(ids, attn, s, keep)),
                                  [[0, 1, 0, 1, 1, 1], [1, 1, 0, 0, 1, 1]])


def _setup():
    params = host_random_params(nn.meta.unbox(abstract_boxed_params(CFG)))
    mel = jnp.asarray(np.random.default_rng(0).normal(
        size=(2, CFG.whisper.n_mels, 2 * CFG.whisper.max_source_positions)), jnp.float32)
    plain_speech = FreezeEmpath(CFG).apply({"params": params}, mel,
                                           method=FreezeEmpath.encode_speech)[0]
    ids = np.asarray(nearest_tokens(plain_speech, params["llm"]["embed_tokens"]["embedding"]))
    # a token the random projector does produce plays "silence", so some positions drop
    silence = int(ids[0, 1])
    cfg = dataclasses.replace(CFG, projector=dataclasses.replace(
        CFG.projector, snap_to_vocab=True, snap_compact=True, snap_silence_id=silence))
    kept = []
    for row in ids:
        valid = [int(t) for t in row if t != silence]
        kept.append([t for j, t in enumerate(valid) if j == 0 or t != valid[j - 1]])
    return cfg, params, mel, kept


def test_compacted_speech_is_read_exactly_as_its_tokens_written_as_text():
    """The masked prefill (training's forward) gives, at the last position, the logits of
    the LLM reading [text, kept tokens, text] as plain ids; rows differ in kept count and one
    is left-padded."""
    cfg, params, mel, kept = _setup()
    s = cfg.speech_token_id
    n_speech = FreezeEmpath(cfg).apply({"params": params}, mel,
                                       method=FreezeEmpath.encode_speech)[0].shape[1]
    assert any(len(k) < n_speech for k in kept), "the test needs dropped positions"
    head, tail = [11, 12, 13], [21, 22]
    rows = [[7] + head + [s] * n_speech + tail, head + [s] * n_speech + tail]  # row 1 padded
    ids, mask = left_pad(rows, 0, max(len(r) for r in rows))
    out = FreezeEmpath(cfg).apply({"params": params}, mel=mel, input_ids=jnp.asarray(ids),
                                  attention_mask=jnp.asarray(mask))
    text_rows = [[7] + head + kept[0] + tail, head + kept[1] + tail]
    t_ids, t_mask = left_pad(text_rows, 0, max(len(r) for r in text_rows))
    ref = FreezeEmpath(cfg).apply({"params": params}, input_ids=jnp.asarray(t_ids),
                                  attention_mask=jnp.asarray(t_mask),
                                  method=FreezeEmpath.llm_forward)
    np.testing.assert_allclose(np.asarray(out.logits[:, -1]), np.asarray(ref.logits[:, -1]),
                               rtol=1e-4, atol=1e-4)
    # the same prompt without compaction reads every snapped position: different logits
    loose = dataclasses.replace(cfg, projector=dataclasses.replace(cfg.projector,
                                                                   snap_compact=False))
    other = FreezeEmpath(loose).apply({"params": params}, mel=mel, input_ids=jnp.asarray(ids),
                                      attention_mask=jnp.asarray(mask))
    assert not np.allclose(np.asarray(other.logits[:, -1]), np.asarray(ref.logits[:, -1]),
                           atol=1e-3)


def chat_two_clips(cfg, params, mel):
    """A ChatModel of `cfg` (byte tokenizer, plain frame), its greedy first-turn replies to
    the two clips of `mel` [2, n_mels, frames] in fresh conversations, and their encoding:
    (chat model, clips, conversations, replies, EncodedTurn)."""
    tok = ByteTokenizer(CFG.llm.vocab_size, CFG.speech_token_id, CFG.emotion_token_id)
    cm = chat.ChatModel(cfg, params, tok, chat_template="plain", audio_seconds=SECONDS)
    mels = [np.asarray(m) for m in mel]
    convs = [chat.Conversation(), chat.Conversation()]
    replies = cm.respond(mels, convs, max_new_tokens=6, temperature=0.0, speech=False)
    return cm, mels, convs, replies, cm.encode(mels, 2)


def greedy_reference(cm, rows, speech, emotion, max_new_tokens: int = 6):
    """Greedy reply ids of prompt `rows` (left-padded here) with `speech` / `emotion` values
    spliced, generated directly from the embeddings (the reference chat must equal)."""
    ids, mask = left_pad(rows, cm.codec.pad_id, max(len(r) for r in rows))
    emb = cm._embed(cm.params, jnp.asarray(ids), speech, emotion)
    ref = sampling_lib.generate_from_embeds(cm.config.llm, cm.params["llm"], emb,
                                            jnp.asarray(mask), max_new_tokens=max_new_tokens,
                                            temperature=0.0, eos_token_id=cm.codec.eos_ids,
                                            pad_token_id=cm.codec.pad_id)
    toks, lens = np.asarray(ref.tokens), np.asarray(ref.lengths)
    return [toks[i, :lens[i]].tolist() for i in range(len(rows))]


def test_chat_with_compaction_answers_as_if_the_tokens_were_typed():
    """`respond` puts only the kept positions in the prompt (rows of different lengths in
    one batch) and its greedy reply equals generation from the prompt with those tokens as
    text; the conversation keeps the kept embeddings for the next turn."""
    cfg, params, mel, kept = _setup()
    cm, mels, convs, replies, enc = chat_two_clips(cfg, params, mel)
    assert [len(enc.row_speech(i)) for i in range(2)] == [len(k) for k in kept]
    rows = []
    for k in kept:
        ids = cm.prompt_ids([], len(k), enc.emotion.shape[1])
        it = iter(k)
        rows.append([next(it) if t == cfg.speech_token_id else t for t in ids])
    ref = greedy_reference(cm, rows, jnp.zeros((2, 1, cfg.llm.hidden_size)), enc.emotion)
    for i, r in enumerate(replies):
        assert r.text_ids == ref[i]
        assert r.heard == cm.codec.decode(kept[i])  # what the LLM read, reported
        assert convs[i].turns[-1].speech_embeds.shape[0] == len(kept[i])
    # a second turn splices the first turn's kept embeddings from the history
    again = cm.respond(mels, convs, max_new_tokens=4, temperature=0.0, speech=False)
    assert len(again) == 2 and all(len(c.turns) == 2 for c in convs)


def test_compaction_with_a_cache_is_refused():
    cfg, params, mel, _ = _setup()
    with pytest.raises(ValueError, match="snap_compact"):
        FreezeEmpath(cfg).apply({"params": params}, mel=mel,
                                input_ids=jnp.full((2, 4), cfg.speech_token_id),
                                cache={"k": jnp.zeros((1, 2, 8, 1, 1)), "index": 0})


def test_nearest_tokens_within_a_vocabulary_and_the_ambiguity_ratio():
    rng = np.random.default_rng(3)
    table = rng.normal(size=(40, 8)).astype(np.float32)
    h = rng.normal(size=(2, 5, 8)).astype(np.float32)
    vocab = (3, 7, 11, 19, 23, 31)
    ids, ratio = nearest_tokens(jnp.asarray(h), jnp.asarray(table), vocab, with_ratio=True)
    d = ((h[:, :, None] - table[list(vocab)][None, None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(vocab)[d.argmin(-1)])
    o = np.sort(d, -1)
    np.testing.assert_allclose(np.asarray(ratio), o[..., 0] / o[..., 1], rtol=1e-4)
    full = nearest_tokens(jnp.asarray(h), jnp.asarray(table))
    np.testing.assert_array_equal(
        np.asarray(full), ((h[:, :, None] - table[None, None]) ** 2).sum(-1).argmin(-1))


def test_ambiguous_positions_are_dropped():
    """`snap_ambiguity` below 1 drops the positions whose two nearest tokens are close."""
    cfg, params, mel, _ = _setup()
    loose = FreezeEmpath(cfg).apply({"params": params}, mel,
                                    method=FreezeEmpath.encode_features).speech_mask
    strict = dataclasses.replace(cfg, projector=dataclasses.replace(cfg.projector,
                                                                    snap_ambiguity=0.9))
    tight = FreezeEmpath(strict).apply({"params": params}, mel,
                                       method=FreezeEmpath.encode_features).speech_mask
    assert int(tight.sum()) < int(loose.sum())
