"""Properties of the explicit KV cache: prefill + chunks + one-token steps equal the full
forward pass, with left padding, for Qwen2-style and Llama-style configs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from freezeempath_jax.models.causal_lm import CausalLM, init_cache, positions_from_mask
from freezeempath_jax.models.configs import LMConfig

QWEN = LMConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=3, num_heads=6,
                num_kv_heads=2, head_dim=8, qkv_bias=True)
LLAMA = dataclasses.replace(QWEN, qkv_bias=False, tie_embeddings=True,
                            rope_scaling_type="llama3", rope_scaling_factor=4.0,
                            rope_original_max_position=8)


def _params(cfg, seed=0):
    v = CausalLM(cfg).init(jax.random.key(seed), input_ids=jnp.zeros((1, 4), jnp.int32))
    # Non-zero biases so the bias paths are exercised.
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape),
                        nn.meta.unbox(v["params"]))


def _batch(seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, 97, (3, 14))
    mask = np.ones((3, 14), np.int32)
    mask[1, :5] = 0  # left padding of different lengths
    mask[2, :2] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


@pytest.mark.parametrize("cfg", [QWEN, LLAMA], ids=["qwen2", "llama"])
def test_chunked_cache_equals_full_forward(cfg):
    p = _params(cfg)
    model = CausalLM(cfg)
    ids, mask = _batch()
    full = model.apply({"params": p}, input_ids=ids, attention_mask=mask).logits
    # Cache longer than the sequence; slots past the sequence marked valid (causality hides).
    slot_mask = jnp.concatenate([mask, jnp.ones((3, 6), jnp.int32)], axis=1)
    cache = init_cache(cfg, 3, 20)
    pieces = []
    for start, stop in [(0, 6), (6, 9), (9, 10), (10, 11), (11, 14)]:
        out = model.apply({"params": p}, input_ids=ids[:, start:stop], attention_mask=slot_mask,
                          cache=cache)
        cache = out.cache
        pieces.append(out.logits)
        assert int(cache["index"]) == stop
    inc = jnp.concatenate(pieces, axis=1)
    real = np.asarray(mask, bool)
    err = np.abs(np.asarray(inc) - np.asarray(full))[real].max()
    assert err < 1e-5, err


def test_left_padding_does_not_change_a_row():
    """A left-padded row gives the same logits as the same tokens unpadded."""
    p = _params(QWEN)
    model = CausalLM(QWEN)
    ids, mask = _batch()
    batched = model.apply({"params": p}, input_ids=ids, attention_mask=mask).logits
    alone = model.apply({"params": p}, input_ids=ids[1:2, 5:]).logits
    np.testing.assert_allclose(np.asarray(batched[1, 5:]), np.asarray(alone[0]), atol=1e-5)


def test_positions_from_mask():
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(positions_from_mask(mask),
                                  [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(positions_from_mask(mask, 3, 2), [[1, 2], [3, 4]])


def test_inputs_embeds_equals_ids():
    p = _params(QWEN)
    model = CausalLM(QWEN)
    ids, mask = _batch()
    emb = model.apply({"params": p}, ids, method=CausalLM.embed)
    a = model.apply({"params": p}, input_ids=ids, attention_mask=mask).logits
    b = model.apply({"params": p}, inputs_embeds=emb, attention_mask=mask).logits
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_same_values_and_grads(policy):
    cfg = dataclasses.replace(QWEN, remat_policy=policy)
    p = _params(QWEN)
    ids, mask = _batch()

    def loss(p, cfg):
        return CausalLM(cfg).apply({"params": p}, input_ids=ids, attention_mask=mask).logits.std()

    g0 = jax.grad(loss)(p, QWEN)
    g1 = jax.grad(loss)(p, cfg)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_bad_inputs_raise():
    p = _params(QWEN)
    with pytest.raises(ValueError, match="exactly one"):
        CausalLM(QWEN).apply({"params": p})
    with pytest.raises(ValueError, match="attention_mask has shape"):
        CausalLM(QWEN).apply({"params": p}, input_ids=jnp.zeros((2, 3), jnp.int32),
                             attention_mask=jnp.ones((2, 4)))


@pytest.mark.parametrize("cfg", [QWEN, LLAMA], ids=["qwen2", "llama"])
def test_unrolled_forward_equals_scanned(cfg):
    """`forward_unrolled` (the decode loop's path: per-layer weights, per-layer cache, the tied
    head contracted without a transpose) gives the scanned model's logits, hidden states and cache, chunk by
    chunk, with left padding."""
    from freezeempath_jax.models.causal_lm import (cache_from_layers, cache_to_layers,
                                                   forward_unrolled, split_layers)
    p = _params(cfg)
    model = CausalLM(cfg)
    ids, mask = _batch()
    slot_mask = jnp.concatenate([mask, jnp.ones((3, 6), jnp.int32)], axis=1)
    scanned = init_cache(cfg, 3, 20)
    unrolled = cache_to_layers(init_cache(cfg, 3, 20))
    layers = split_layers(p)
    assert len(layers) == cfg.num_layers
    for start, stop in [(0, 9), (9, 10), (10, 11), (11, 14)]:
        a = model.apply({"params": p}, input_ids=ids[:, start:stop], attention_mask=slot_mask,
                        cache=scanned)
        b = forward_unrolled(cfg, p, layers, input_ids=ids[:, start:stop],
                             attention_mask=slot_mask, cache=unrolled)
        np.testing.assert_allclose(np.asarray(b.logits), np.asarray(a.logits), atol=1e-5)
        np.testing.assert_allclose(np.asarray(b.hidden_states), np.asarray(a.hidden_states),
                                   atol=1e-5)
        stacked = cache_from_layers(b.cache)
        for k in ("k", "v"):
            np.testing.assert_allclose(np.asarray(stacked[k]), np.asarray(a.cache[k]),
                                       atol=1e-5)
        assert int(stacked["index"]) == int(a.cache["index"]) == stop
        scanned, unrolled = a.cache, b.cache


def test_split_layers_names_the_problem():
    with pytest.raises(KeyError, match="layers"):
        from freezeempath_jax.models.causal_lm import split_layers
        split_layers({"embed_tokens": {}})
