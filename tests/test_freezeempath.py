"""The composite model: splicing speech/emotion embeddings at placeholder positions, batching
with padding, and every part's parameters present."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from freezeempath_jax.models import presets
from freezeempath_jax.models.causal_lm import CausalLM
from freezeempath_jax.models.freezeempath import FreezeEmpath, splice

CFG = presets.TINY
SP, EM = CFG.speech_token_id, CFG.emotion_token_id
FRAMES = 200  # 2 s of mel frames -> 100 encoder positions -> 20 speech tokens
S = 20


def _prompt(prefix, suffix):
    """[prefix..., S x <speech>, <emotion>, suffix...] (as the tokenizer expands them)."""
    return list(prefix) + [SP] * S + [EM] + list(suffix)


@pytest.fixture(scope="module")
def setup():
    model = FreezeEmpath(CFG)
    mel = jax.random.normal(jax.random.key(1), (2, 80, FRAMES))
    ids = jnp.asarray([_prompt([10, 11, 12], [20, 21]), _prompt([13, 14, 15], [22, 23])])
    v = model.init(jax.random.key(0), mel, ids)
    return model, nn.meta.unbox(v["params"]), mel, ids


def test_every_part_has_parameters(setup):
    _, p, _, _ = setup
    assert set(p) == {"whisper", "projector", "emotion", "llm", "speech_decoder"}


def test_splice_equals_embeddings_fed_by_hand(setup):
    model, p, mel, ids = setup
    out = model.apply({"params": p}, mel, ids)
    speech, emo, ser = model.apply({"params": p}, mel, method=FreezeEmpath.encode_speech)
    assert speech.shape == (2, S, CFG.llm.hidden_size) and emo.shape == (2, 1, 64)
    assert ser.shape == (2, 5)
    # Hand-built: embed the text tokens, then overwrite rows 3..3+S and 3+S by the features.
    tok = np.asarray(p["llm"]["embed_tokens"]["embedding"])[np.asarray(ids)]
    tok[:, 3:3 + S] = np.asarray(speech)
    tok[:, 3 + S] = np.asarray(emo[:, 0])
    ref = CausalLM(CFG.llm).apply({"params": p["llm"]}, inputs_embeds=jnp.asarray(tok))
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.hidden_states), np.asarray(ref.hidden_states),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.ser_logits), np.asarray(ser), atol=1e-6)


def test_left_padded_batch_equals_one_by_one(setup):
    model, p, mel, _ = setup
    long = _prompt([10, 11, 12, 13, 14], [20])
    short = _prompt([15], [21, 22])
    width = max(len(long), len(short))
    ids = np.zeros((2, width), np.int32)
    mask = np.zeros((2, width), np.int32)
    for i, row in enumerate([long, short]):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    fwd = jax.jit(lambda p, m, i, a: model.apply({"params": p}, m, i, attention_mask=a).logits)
    batched = np.asarray(fwd(p, mel, jnp.asarray(ids), jnp.asarray(mask)))
    for i, row in enumerate([long, short]):
        alone = model.apply({"params": p}, mel[i:i + 1], jnp.asarray([row])).logits
        np.testing.assert_allclose(batched[i, width - len(row):], np.asarray(alone[0]),
                                   atol=2e-5)


def test_splice_keeps_order_and_leaves_text_alone():
    emb = jnp.zeros((1, 6, 2))
    ids = jnp.asarray([[9, 3, 3, 9, 3, 9]])
    vals = jnp.asarray([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]])
    out = np.asarray(splice(emb, ids, 3, vals))[0, :, 0]
    np.testing.assert_array_equal(out, [0, 1, 2, 0, 3, 0])


def test_encoder_states_path_equals_mel_path(setup):
    """Training may feed cached frozen-encoder outputs instead of mel."""
    model, p, mel, ids = setup
    states = model.apply({"params": p}, mel, method=FreezeEmpath.encode_audio)
    a = model.apply({"params": p}, mel, ids).logits
    b = model.apply({"params": p}, input_ids=ids, encoder_states=states).logits
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
