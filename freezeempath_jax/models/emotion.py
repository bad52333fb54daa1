"""Emotion extractor + SER head (DESIGN.md section 2).

All Whisper block outputs [L, B, T, d] ->
  1. layer gate: per-layer time mean [B, L, d] -> gate_fc1 -> ReLU -> gate_fc2 -> softmax over L
  2. gated sum over layers [B, T, d] -> layernorm
  3. attn_pool: Q learned latent queries attend over the T frames (multi-head, biased q/k/v/out)
  4. linear1 -> ReLU -> linear2: emotion embedding [B, Q, H] in the LLM's space
SER head (no bias) on the mean over queries -> 5 logits; optional attribute regression head
(arousal / valence / dominance, RE-LLM style) when `num_attributes > 0`; optional
paralinguistic heads (speaker gender, age group: OSUM-EChat style) on the same vector, whose
probability-weighted class embeddings can be appended to the emotion embedding
(`splice_cues`: [B, Q + heads, H]).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from freezeempath_jax.models.configs import EmotionConfig, to_dtype
from freezeempath_jax.models.layers import NEG_INF, Dense, layer_norm
from freezeempath_jax.sharding import constrain

BTD = ("activation_batch", "activation_length", "activation_embed")


@struct.dataclass
class EmotionOutput:
    embedding: jax.Array  # [B, Q, H]
    ser_logits: jax.Array  # [B, num_classes] float32
    attributes: Optional[jax.Array]  # [B, num_attributes] float32, or None
    layer_weights: jax.Array  # [B, L] float32, softmax over the encoder layers
    # {"gender": [B, 2], "age": [B, 3]} float32 logits of the enabled paralinguistic heads
    cue_logits: Optional[Dict[str, jax.Array]] = None


class AttentionPool(nn.Module):
    """`latent_queries [Q, d]` attend over frames [B, T, d] -> [B, Q, d].

    Same maths as torch `nn.MultiheadAttention(d, num_heads, batch_first=True)` with the
    queries as `query` and the frames as `key`/`value`: the packed `in_proj_weight [3d, d]`
    splits in thirds into q_proj / k_proj / v_proj (kernel = W.T reshaped [d, heads, d/heads]),
    logits scaled by 1/sqrt(d/heads), softmax in float32.
    """

    d_model: int
    num_heads: int
    num_queries: int
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    @nn.compact
    def __call__(self, x, frame_mask=None):
        d, n = self.d_model, self.num_heads
        if d % n:
            raise ValueError(f"attn_pool: width {d} is not divisible by num_heads {n}")
        hd = d // n
        dtype = to_dtype(self.dtype)
        queries = self.param(
            "latent_queries",
            # torch.randn-like scale: keys come out of a LayerNorm, so unit-scale queries give
            # attention logits of order one from the start.
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("queries", "audio_embed")),
            (self.num_queries, d), to_dtype(self.param_dtype))
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        axes = ("audio_embed", "audio_heads", "head_dim")
        q = Dense((n, hd), axes, name="q_proj", **common)(queries.astype(dtype))  # [Q, n, hd]
        k = Dense((n, hd), axes, name="k_proj", **common)(x)  # [B, T, n, hd]
        v = Dense((n, hd), axes, name="v_proj", **common)(x)
        q = q * jnp.asarray(hd ** -0.5, q.dtype)
        logits = jnp.einsum("qnh,btnh->bnqt", q, k, preferred_element_type=jnp.float32)
        if frame_mask is not None:
            logits = jnp.where(frame_mask[:, None, None, :] > 0, logits, NEG_INF)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bnqt,btnh->bqnh", probs, v)
        return Dense((d,), ("audio_heads", "head_dim", "audio_embed"), in_dims=2,
                     name="out_proj", **common)(out)


class EmotionExtractor(nn.Module):
    """Whisper block outputs [L, B, T, d] -> `EmotionOutput` (embedding [B, Q, H], SER logits,
    optional attributes, layer weights).

    `frame_mask [B, T]` (1 = real frame) is an extension for inputs shorter than the padded
    30 s: it restricts both the per-layer time mean and the attention pooling to real frames.
    The release has no mask (every input is padded to 30 s); None reproduces it exactly.
    """

    config: EmotionConfig
    out_dim: int  # LLM width H
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    @nn.compact
    def __call__(self, layer_states, frame_mask=None) -> EmotionOutput:
        c = self.config
        if layer_states.ndim != 4:
            raise ValueError("EmotionExtractor expects layer states [L, B, T, d], got shape "
                             f"{layer_states.shape}")
        n_layers, b, t, d = layer_states.shape
        if frame_mask is not None and frame_mask.shape != (b, t):
            raise ValueError(f"frame_mask has shape {frame_mask.shape}, expected {(b, t)}")
        dtype = to_dtype(self.dtype)
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        states = layer_states.astype(dtype)

        # 1. Layer gate from each layer's time-averaged state (mean accumulated in float32).
        if frame_mask is None:
            pooled = jnp.mean(states.astype(jnp.float32), axis=2)  # [L, B, d]
        else:
            m = frame_mask.astype(jnp.float32)
            pooled = jnp.einsum("lbtd,bt->lbd", states.astype(jnp.float32), m) / jnp.maximum(
                m.sum(axis=1), 1.0)[None, :, None]
        pooled = jnp.transpose(pooled, (1, 0, 2)).astype(dtype)  # [B, L, d]
        g = Dense((c.gate_hidden,), ("audio_embed", "gate_hidden"), name="gate_fc1",
                  **common)(pooled)
        g = Dense((1,), ("gate_hidden", None), name="gate_fc2", **common)(nn.relu(g))[..., 0]
        weights = jax.nn.softmax(g.astype(jnp.float32), axis=-1)  # [B, L]

        # 2. Gated sum over layers, then LayerNorm.
        x = jnp.einsum("bl,lbtd->btd", weights.astype(dtype), states)
        x = constrain(x, BTD)
        x = layer_norm("layernorm", c.layer_norm_eps, self.dtype, self.param_dtype)(x)

        # 3. Attention pooling to Q vectors.
        x = AttentionPool(d, c.num_heads, c.num_queries, name="attn_pool", **common)(
            x, frame_mask)  # [B, Q, d]

        # 4. MLP into the LLM's space.
        h = Dense((c.mlp_hidden,), ("audio_embed", "adapter_hidden"), name="linear1",
                  **common)(x)
        emb = Dense((self.out_dim,), ("adapter_hidden", "embed"), name="linear2",
                    **common)(nn.relu(h))
        emb = constrain(emb, BTD)

        # Heads read one vector per clip: the mean over queries (the embedding itself at Q = 1).
        clip = jnp.mean(emb, axis=1)
        ser = Dense((c.num_classes,), ("embed", "classes"), use_bias=False, name="ser_head",
                    **common)(clip).astype(jnp.float32)
        attrs = None
        if c.num_attributes > 0:
            attrs = Dense((c.num_attributes,), ("embed", "classes"), name="attr_head",
                          **common)(clip).astype(jnp.float32)
        cues, cue_embeds = {}, []
        for name, classes in c.cue_heads:
            logits = Dense((classes,), ("embed", "classes"), name=f"{name}_head",
                           **common)(clip).astype(jnp.float32)
            cues[name] = logits
            if c.splice_cues:
                # soft class embedding: gradients reach the head through the LLM too
                table = self.param(f"{name}_embed", nn.with_logical_partitioning(
                    nn.initializers.normal(0.02), ("classes", "embed")),
                    (classes, self.out_dim), to_dtype(self.param_dtype))
                probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
                cue_embeds.append(jnp.einsum("bk,kh->bh", probs, table.astype(dtype))[:, None])
        if cue_embeds:
            emb = jnp.concatenate([emb] + cue_embeds, axis=1)  # [B, Q + heads, H]
        return EmotionOutput(embedding=emb, ser_logits=ser, attributes=attrs,
                             layer_weights=weights, cue_logits=cues or None)
