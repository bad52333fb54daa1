"""Whisper text decoder (the ASR half of Whisper), with an explicit KV cache.

Pre-LN blocks `x + self_attn(ln(x))`, `x + cross_attn(ln(x), encoder)`, `x + mlp(ln(x))`, a
final LayerNorm, learned positions, and the token embedding tied with the output layer.
Projections follow the encoder's convention: q/v/out biased, k unbiased, in both attentions.

Cache layout (`init_decoder_cache`): {"k", "v": [L, B, S, N, D] self-attention slots,
"cross_k", "cross_v": [L, B, T_enc, N, D] the encoder states projected once, "index": int32
slot of the next token}. A call with `encoder_states` (the prefill) fills the cross part;
later calls leave `encoder_states` None and read it back, so the 1500-frame projection is
paid once per clip rather than once per token. All rows share the prompt (the SOT sequence),
so there is no padding and a token's position equals its slot.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from freezeempath_jax.models.configs import WhisperDecoderConfig, to_dtype
from freezeempath_jax.models.layers import Dense, attention, layer_norm
from freezeempath_jax.sharding import constrain

BTD = ("activation_batch", "activation_length", "activation_embed")


@struct.dataclass
class DecoderOutput:
    logits: Optional[jax.Array]  # [B, T, V] float32 (T = 1 with last_logits_only)
    hidden_states: jax.Array  # [B, T, d] after the final LayerNorm
    cache: Optional[Any]


def init_decoder_cache(config: WhisperDecoderConfig, batch: int, max_len: int,
                       encoder_len: int, dtype=None) -> dict:
    """Zeroed cache for `max_len` token slots and `encoder_len` encoder frames."""
    dtype = to_dtype(dtype or config.dtype)
    hd = config.d_model // config.num_heads
    self_shape = (config.num_layers, batch, max_len, config.num_heads, hd)
    cross_shape = (config.num_layers, batch, encoder_len, config.num_heads, hd)
    return {"k": jnp.zeros(self_shape, dtype), "v": jnp.zeros(self_shape, dtype),
            "cross_k": jnp.zeros(cross_shape, dtype), "cross_v": jnp.zeros(cross_shape, dtype),
            "index": jnp.zeros((), jnp.int32)}


class _Attention(nn.Module):
    """Multi-head attention; keys / values come from `source` (self: x, cross: encoder) or,
    when `source` is None, from `cached` (cross-attention after the prefill)."""

    config: WhisperDecoderConfig

    @nn.compact
    def __call__(self, x, source, mask, cached=None, index=None):
        c = self.config
        common = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        hd = c.d_model // c.num_heads
        axes = ("audio_embed", "audio_heads", "head_dim")
        q = Dense((c.num_heads, hd), axes, name="q_proj", **common)(x)
        q = q * jnp.asarray(hd ** -0.5, q.dtype)
        if source is not None:
            k = Dense((c.num_heads, hd), axes, use_bias=False, name="k_proj", **common)(source)
            v = Dense((c.num_heads, hd), axes, name="v_proj", **common)(source)
        else:
            k, v = cached
        new = (k, v)
        if index is not None:  # self-attention with a cache: write this chunk at `index`
            k_all = jax.lax.dynamic_update_slice_in_dim(cached[0], k.astype(cached[0].dtype),
                                                        index, 1)
            v_all = jax.lax.dynamic_update_slice_in_dim(cached[1], v.astype(cached[1].dtype),
                                                        index, 1)
            new = (k_all, v_all)
            k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)
        out = attention(q, k, v, mask)
        out = Dense((c.d_model,), ("audio_heads", "head_dim", "audio_embed"), in_dims=2,
                    name="out_proj", **common)(out)
        return out, new


class _MLP(nn.Module):
    config: WhisperDecoderConfig

    @nn.compact
    def __call__(self, h):
        c = self.config
        common = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        h = Dense((c.mlp_dim,), ("audio_embed", "audio_mlp"), name="fc1", **common)(h)
        h = nn.gelu(h, approximate=False)
        return Dense((c.d_model,), ("audio_mlp", "audio_embed"), name="fc2", **common)(h)


class _Block(nn.Module):
    """One decoder block; scanned over layers with its slice of the cache."""

    config: WhisperDecoderConfig

    @nn.compact
    def __call__(self, x, encoder_states, self_mask, kv, index):
        c = self.config
        ln = dict(eps=c.layer_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        h = layer_norm("self_attn_ln", **ln)(x)
        self_cached = None if kv is None else (kv["k"], kv["v"])
        h, (k, v) = _Attention(c, name="self_attn")(
            h, h, self_mask, self_cached, None if kv is None else index)
        x = x + h
        cross_cached = None if kv is None else (kv["cross_k"], kv["cross_v"])
        h, (ck, cv) = _Attention(c, name="cross_attn")(
            layer_norm("cross_attn_ln", **ln)(x), encoder_states, jnp.ones((1, 1, 1, 1), bool),
            cross_cached)
        x = x + h
        x = x + _MLP(c, name="mlp")(layer_norm("mlp_ln", **ln)(x))
        new_kv = None
        if kv is not None:
            dt = kv["cross_k"].dtype
            new_kv = {"k": k, "v": v, "cross_k": ck.astype(dt), "cross_v": cv.astype(dt)}
        return constrain(x, BTD), new_kv


class WhisperDecoder(nn.Module):
    """Whisper's text decoder.

    `apply({"params": p}, tokens, encoder_states=..., cache=None, last_logits_only=False)`
    returns a `DecoderOutput`:
    - without a cache: a causal pass over `tokens [B, T]` (positions 0..T-1) attending to
      `encoder_states [B, T_enc, d]`;
    - with a cache (`init_decoder_cache`): `tokens` are written at `cache["index"]` (their
      positions), `encoder_states` fills the cross-attention part when given (the prefill) and
      is read back from the cache when None; the returned cache has `index` advanced.
    Logits are float32 and come from the tied token embedding.
    """

    config: WhisperDecoderConfig

    def setup(self):
        c = self.config
        pdtype = to_dtype(c.param_dtype)
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.d_model, dtype=to_dtype(c.dtype), param_dtype=pdtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                        ("vocab", "audio_embed")))
        self.embed_positions = self.param(
            "embed_positions", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                            ("positions", "audio_embed")),
            (c.max_target_positions, c.d_model), pdtype)
        self.layers = nn.scan(
            _Block, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"})(c)
        self.ln = layer_norm("ln", c.layer_norm_eps, c.dtype, c.param_dtype)

    def __call__(self, tokens, encoder_states=None, cache=None, last_logits_only: bool = False):
        c = self.config
        dtype = to_dtype(c.dtype)
        b, t = tokens.shape
        index = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
        s = t if cache is None else cache["k"].shape[2]
        if cache is None and encoder_states is None:
            raise ValueError("a call without a cache needs encoder_states")
        pos = jax.lax.dynamic_slice_in_dim(self.embed_positions, index, t, axis=0)
        x = constrain(self.embed_tokens(tokens) + pos.astype(dtype)[None], BTD)
        q_slot = index + jnp.arange(t)
        mask = (jnp.arange(s)[None, :] <= q_slot[:, None])[None, None]  # [1, 1, T, S]
        if encoder_states is not None:
            encoder_states = encoder_states.astype(dtype)
        kv = None if cache is None else {k: cache[k] for k in ("k", "v", "cross_k", "cross_v")}
        x, new_kv = self.layers(x, encoder_states, mask, kv, index)
        hidden = self.ln(x)
        new_cache = None if cache is None else dict(new_kv, index=index + t)
        h = hidden[:, -1:] if last_logits_only else hidden
        logits = self.embed_tokens.attend(h).astype(jnp.float32)
        return DecoderOutput(logits=logits, hidden_states=hidden, cache=new_cache)
