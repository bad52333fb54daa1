"""Full-size configs built abstractly (jax.eval_shape): parameter counts match published sizes
and no memory is allocated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from freezeempath_jax.models import presets
from freezeempath_jax.models.causal_lm import CausalLM
from freezeempath_jax.models.whisper import WhisperEncoder


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _lm_params(cfg):
    return jax.eval_shape(lambda: CausalLM(cfg).init(
        jax.random.key(0), input_ids=jnp.zeros((1, 4), jnp.int32)))["params"]


def test_whisper_large_v3_encoder_size():
    p = jax.eval_shape(lambda: WhisperEncoder(presets.WHISPER_LARGE_V3).init(
        jax.random.key(0), jnp.zeros((1, 128, 3000))))["params"]
    n = _count(p)
    positions = 1500 * 1280  # fixed sinusoid table, not a trained weight
    # Published: ~635M parameters in the large-v3 encoder.
    assert abs((n - positions) / 1e6 - 635.0) < 1.0, n
    # layer_states must be [L, B, T, d] for the emotion extractor.
    out = jax.eval_shape(lambda p, m: WhisperEncoder(presets.WHISPER_LARGE_V3).apply(
        {"params": p}, m), p, jax.ShapeDtypeStruct((2, 128, 3000), jnp.float32))
    assert out.layer_states.shape == (32, 2, 1500, 1280)
    assert out.last_hidden_state.shape == (2, 1500, 1280)


@pytest.mark.parametrize("cfg,billions,tol", [
    (presets.QWEN25_7B_INSTRUCT, 7.62, 0.01),   # Qwen2.5-7B-Instruct: 7.61B published
    (presets.QWEN25_05B, 0.494, 0.001),          # Qwen2.5-0.5B: 0.49B
    (presets.SMOLLM2_135M_INSTRUCT, 0.1345, 0.001),  # SmolLM2-135M
])
def test_llm_sizes(cfg, billions, tol):
    n = _count(_lm_params(cfg))
    assert abs(n / 1e9 - billions) < tol, n


def test_qwen7b_tree_layout():
    from flax import linen as nn
    p = nn.meta.unbox(_lm_params(presets.QWEN25_7B_INSTRUCT))
    layers = p["layers"]
    assert layers["attn"]["q_proj"]["kernel"].shape == (28, 3584, 28, 128)
    assert layers["attn"]["k_proj"]["kernel"].shape == (28, 3584, 4, 128)
    assert layers["attn"]["q_proj"]["bias"].shape == (28, 28, 128)
    assert "bias" not in layers["attn"]["o_proj"]
    assert p["lm_head"]["kernel"].shape == (3584, 152064)


def test_logical_axes_on_every_param():
    from flax import linen as nn
    v = jax.eval_shape(lambda: CausalLM(presets.QWEN25_05B).init(
        jax.random.key(0), input_ids=jnp.zeros((1, 4), jnp.int32)))
    specs = nn.get_partition_spec(v)["params"]
    leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert leaves and all(len(s) > 0 and all(a is not None for a in s) for s in leaves)
