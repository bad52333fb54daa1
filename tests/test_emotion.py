"""Emotion extractor + SER head against a PyTorch reference written from DESIGN.md section 2,
using torch.nn.MultiheadAttention (batch_first, packed in_proj) exactly like the release.

Random weights are copied torch -> flax by the docs/params.md mapping; float32; max abs error
<= 1e-5 expected on the embedding, SER logits, attributes and layer weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import linen as nn

from freezeempath_jax.models.configs import EmotionConfig
from freezeempath_jax.models.emotion import EmotionExtractor

TOL = 1e-5


class TorchEmotion(torch.nn.Module):
    """Release-style extractor; input [B, L, T, d] (the release's layout)."""

    def __init__(self, d, out, cfg: EmotionConfig):
        super().__init__()
        self.gate_fc1 = torch.nn.Linear(d, cfg.gate_hidden)
        self.gate_fc2 = torch.nn.Linear(cfg.gate_hidden, 1)
        self.layernorm = torch.nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.latent_queries = torch.nn.Parameter(torch.randn(cfg.num_queries, d))
        self.multihead_attn = torch.nn.MultiheadAttention(d, cfg.num_heads, batch_first=True)
        self.linear1 = torch.nn.Linear(d, cfg.mlp_hidden)
        self.linear2 = torch.nn.Linear(cfg.mlp_hidden, out)
        self.ser_head = torch.nn.Linear(out, cfg.num_classes, bias=False)
        self.attr_head = (torch.nn.Linear(out, cfg.num_attributes)
                          if cfg.num_attributes else None)

    def forward(self, states, frame_mask=None):
        if frame_mask is None:
            pooled = states.mean(dim=2)
        else:
            m = frame_mask[:, None, :, None].float()
            pooled = (states * m).sum(2) / m.sum(2)
        w = torch.softmax(self.gate_fc2(F.relu(self.gate_fc1(pooled))).squeeze(-1), dim=-1)
        x = self.layernorm((w[:, :, None, None] * states).sum(dim=1))
        q = self.latent_queries.unsqueeze(0).expand(states.shape[0], -1, -1)
        pad = None if frame_mask is None else ~frame_mask.bool()
        x, _ = self.multihead_attn(q, x, x, key_padding_mask=pad, need_weights=False)
        emb = self.linear2(F.relu(self.linear1(x)))
        clip = emb.mean(dim=1)
        attrs = self.attr_head(clip) if self.attr_head is not None else None
        return emb, self.ser_head(clip), attrs, w


def _np(t):
    return t.detach().numpy()


def _lin(layer):
    out = {"kernel": _np(layer.weight).T}
    if layer.bias is not None:
        out["bias"] = _np(layer.bias)
    return out


def torch_to_flax(ref: TorchEmotion, d, heads):
    hd = d // heads
    mha = ref.multihead_attn
    w, b = _np(mha.in_proj_weight), _np(mha.in_proj_bias)
    pool = {"latent_queries": _np(ref.latent_queries)}
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        pool[name] = {"kernel": w[i * d:(i + 1) * d].T.reshape(d, heads, hd),
                      "bias": b[i * d:(i + 1) * d].reshape(heads, hd)}
    pool["out_proj"] = {"kernel": _np(mha.out_proj.weight).T.reshape(heads, hd, d),
                        "bias": _np(mha.out_proj.bias)}
    p = {"gate_fc1": _lin(ref.gate_fc1), "gate_fc2": _lin(ref.gate_fc2),
         "layernorm": {"scale": _np(ref.layernorm.weight), "bias": _np(ref.layernorm.bias)},
         "attn_pool": pool, "linear1": _lin(ref.linear1), "linear2": _lin(ref.linear2),
         "ser_head": _lin(ref.ser_head)}
    if ref.attr_head is not None:
        p["attr_head"] = _lin(ref.attr_head)
    return p


def _randomise(module, seed):
    # Non-trivial biases and norms so a dropped or swapped term shows up.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in module.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.25)


CASES = [  # (L, Q, heads, A, T, masked)
    (4, 1, 4, 0, 12, False),   # release shape: one query
    (2, 3, 2, 3, 9, False),    # several queries + A/V/D head
    (5, 2, 4, 0, 10, True),    # short inputs with a frame mask
    (1, 1, 1, 0, 7, False),    # one layer, one head
]


@pytest.mark.parametrize("layers,queries,heads,attrs,frames,masked", CASES)
def test_matches_torch_reference(layers, queries, heads, attrs, frames, masked):
    d, out, b = 16, 12, 3
    cfg = EmotionConfig(gate_hidden=8, num_heads=heads, num_queries=queries, mlp_hidden=20,
                        num_attributes=attrs)
    torch.manual_seed(layers * 100 + queries)
    ref = TorchEmotion(d, out, cfg).eval()
    _randomise(ref, seed=layers + queries)
    states = torch.randn(b, layers, frames, d) * 2.0 + 0.3
    mask = None
    if masked:
        lengths = torch.tensor([frames, frames - 3, 4])
        mask = (torch.arange(frames)[None, :] < lengths[:, None]).int()
    with torch.no_grad():
        emb, ser, att, w = ref(states, mask)

    model = EmotionExtractor(cfg, out)
    got = jax.jit(model.apply)({"params": torch_to_flax(ref, d, heads)},
                      jnp.asarray(states.numpy().transpose(1, 0, 2, 3)),  # [L, B, T, d]
                      None if mask is None else jnp.asarray(mask.numpy()))
    assert got.embedding.shape == (b, queries, out)
    assert got.ser_logits.shape == (b, 5) and got.ser_logits.dtype == jnp.float32
    assert got.layer_weights.shape == (b, layers)
    errs = {"embedding": np.max(np.abs(np.asarray(got.embedding) - emb.numpy())),
            "ser": np.max(np.abs(np.asarray(got.ser_logits) - ser.numpy())),
            "weights": np.max(np.abs(np.asarray(got.layer_weights) - w.numpy()))}
    if attrs:
        assert got.attributes.shape == (b, attrs)
        errs["attributes"] = np.max(np.abs(np.asarray(got.attributes) - att.numpy()))
    else:
        assert got.attributes is None
    assert max(errs.values()) <= TOL, errs


def test_frame_mask_equals_truncated_input():
    # Masked frames must not matter at all: padded input + mask == the unpadded input.
    cfg = EmotionConfig(gate_hidden=8, num_heads=2, num_queries=2, mlp_hidden=16)
    torch.manual_seed(3)
    ref = TorchEmotion(8, 8, cfg)
    _randomise(ref, seed=3)
    v = {"params": torch_to_flax(ref, 8, 2)}
    model = EmotionExtractor(cfg, 8)
    rng = np.random.default_rng(0)
    short = rng.standard_normal((3, 2, 6, 8)).astype(np.float32)  # [L, B, T, d]
    padded = np.concatenate([short, 5.0 * rng.standard_normal((3, 2, 4, 8), np.float32)], axis=2)
    mask = np.asarray([[1] * 6 + [0] * 4] * 2)
    apply = jax.jit(model.apply)
    a = apply(v, short)
    b = apply(v, padded, mask)
    c = apply(v, padded)  # no mask: the padding does change the result
    np.testing.assert_allclose(np.asarray(a.embedding), np.asarray(b.embedding), atol=1e-5)
    np.testing.assert_allclose(np.asarray(a.ser_logits), np.asarray(b.ser_logits), atol=1e-5)
    np.testing.assert_allclose(np.asarray(a.layer_weights), np.asarray(b.layer_weights),
                               atol=1e-6)
    assert np.max(np.abs(np.asarray(a.embedding) - np.asarray(c.embedding))) > 1e-3


def test_param_tree_shapes_and_logical_axes():
    d, out = 16, 24
    cfg = EmotionConfig(gate_hidden=8, num_heads=4, num_queries=2, mlp_hidden=32,
                        num_attributes=3)
    model = EmotionExtractor(cfg, out)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((3, 1, 10, d))))[
        "params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    shapes = jax.tree.map(lambda x: x.shape, nn.meta.unbox(boxed))
    assert shapes == {
        "gate_fc1": {"kernel": (d, 8), "bias": (8,)},
        "gate_fc2": {"kernel": (8, 1), "bias": (1,)},
        "layernorm": {"scale": (d,), "bias": (d,)},
        "attn_pool": {"latent_queries": (2, d),
                      "q_proj": {"kernel": (d, 4, 4), "bias": (4, 4)},
                      "k_proj": {"kernel": (d, 4, 4), "bias": (4, 4)},
                      "v_proj": {"kernel": (d, 4, 4), "bias": (4, 4)},
                      "out_proj": {"kernel": (4, 4, d), "bias": (d,)}},
        "linear1": {"kernel": (d, 32), "bias": (32,)},
        "linear2": {"kernel": (32, out), "bias": (out,)},
        "ser_head": {"kernel": (out, 5)},
        "attr_head": {"kernel": (out, 3), "bias": (3,)},
    }


def test_bad_inputs_raise_clear_errors():
    model = EmotionExtractor(EmotionConfig(gate_hidden=4, num_heads=3, mlp_hidden=8), 8)
    with pytest.raises(ValueError, match=r"\[L, B, T, d\]"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 10, 16))))
    with pytest.raises(ValueError, match="not divisible by num_heads 3"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 1, 10, 16))))
    ok = EmotionExtractor(EmotionConfig(gate_hidden=4, num_heads=2, mlp_hidden=8), 8)
    with pytest.raises(ValueError, match="frame_mask has shape"):
        jax.eval_shape(lambda: ok.init(jax.random.key(0), jnp.zeros((2, 1, 10, 16)),
                                       jnp.ones((1, 9))))
