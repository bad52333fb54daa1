"""Whisper encoder properties that need no reference: short inputs, input checks, remat."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from freezeempath_jax.models.configs import WhisperConfig
from freezeempath_jax.models.whisper import WhisperEncoder, sinusoids

CFG = WhisperConfig(n_mels=80, d_model=32, num_layers=2, num_heads=4, mlp_dim=64,
                    max_source_positions=40)


def _init(cfg):
    return nn.meta.unbox(WhisperEncoder(cfg).init(jax.random.key(0), jnp.zeros((1, 80, 80))))


def test_sinusoids_match_whisper_formula():
    table = sinusoids(6, 8)
    inc = np.log(10000) / 3
    t = 5 * np.exp(-inc * 2)
    assert table.shape == (6, 8)
    np.testing.assert_allclose(table[5, 2], np.sin(t), rtol=1e-6)
    np.testing.assert_allclose(table[5, 6], np.cos(t), rtol=1e-6)


def test_short_input_requires_flag_and_slices_positions():
    v = _init(CFG)
    with pytest.raises(ValueError, match="allow_short_inputs"):
        WhisperEncoder(CFG).apply(v, jnp.zeros((1, 80, 40)))
    short = dataclasses.replace(CFG, allow_short_inputs=True)
    mel = jax.random.normal(jax.random.key(2), (2, 80, 40))
    out = WhisperEncoder(short).apply(v, mel)
    assert out.last_hidden_state.shape == (2, 20, 32)
    assert out.layer_states.shape == (2, 2, 20, 32)


def test_wrong_mel_bins_named_in_error():
    v = _init(CFG)
    with pytest.raises(ValueError, match=r"\[B, 80, frames\]"):
        WhisperEncoder(CFG).apply(v, jnp.zeros((1, 128, 80)))


def test_last_state_is_ln_post_of_last_layer_state():
    v = _init(CFG)
    mel = jax.random.normal(jax.random.key(3), (1, 80, 80))
    out = WhisperEncoder(CFG).apply(v, mel)
    x = np.asarray(out.layer_states[-1])
    ln = v["params"]["ln_post"]
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    ref = (x - mu) / np.sqrt(var + 1e-5) * np.asarray(ln["scale"]) + np.asarray(ln["bias"])
    np.testing.assert_allclose(np.asarray(out.last_hidden_state), ref, atol=1e-5)


def test_remat_same_output():
    v = _init(CFG)
    mel = jax.random.normal(jax.random.key(4), (1, 80, 80))
    a = WhisperEncoder(CFG).apply(v, mel).last_hidden_state
    b = WhisperEncoder(dataclasses.replace(CFG, remat_policy="full")).apply(v, mel)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b.last_hidden_state), atol=1e-6)
