"""Decoder-only causal LM covering the Qwen2 and Llama families (config flags), with an
explicit fixed-size KV cache that is passed in and returned.

Cache layout: {"k": [L, B, S, K, D], "v": [L, B, S, K, D], "index": int32 scalar}; `index` is
the slot where the next chunk of tokens is written. Slots are positions in the cache, not
token positions: with left padding a row's token positions start later than slot 0, and
`attention_mask [B, S]` marks which slots hold real tokens.

Two ways through the layers, equal in value:

- `CausalLM.__call__`: one `nn.scan` over the stacked layer weights (compact code; prefill,
  training).
- `forward_unrolled`: a Python loop over per-layer weights (`split_layers`) and a per-layer
  cache (`cache_to_layers`). The decode loop uses it: inside a `while_loop`, the scan slices
  every layer's weights out of the stacked arrays each step and writes the cache as a fresh
  stacked output, while the unrolled form takes the slices once, before the loop, and updates
  each layer's cache in place.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from freezeempath_jax.models.configs import LMConfig, to_dtype
from freezeempath_jax.models.layers import (Dense, RMSNorm, apply_rope, attention, maybe_remat,
                                            rope_inv_freq)
from freezeempath_jax.sharding import constrain

BTE = ("activation_batch", "activation_length", "activation_embed")


def _attend_mask(attention_mask, index, t: int):
    """Bool [B, 1, T, S]: query slot index + i attends to real slots up to itself."""
    s = attention_mask.shape[1]
    q_slot = index + jnp.arange(t)
    causal = jnp.arange(s)[None, :] <= q_slot[:, None]  # [T, S]
    return causal[None, None] & (attention_mask[:, None, None, :] > 0)


@struct.dataclass
class LMOutput:
    logits: Optional[jax.Array]  # [B, T, V] float32 (T = 1 with last_logits_only)
    hidden_states: jax.Array  # [B, T, H], after the final norm
    cache: Optional[Any]


def init_cache(config: LMConfig, batch: int, max_len: int, dtype=None) -> dict:
    """Zeroed KV cache for `max_len` slots (dtype defaults to the computation dtype)."""
    dtype = to_dtype(dtype or config.dtype)
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "index": jnp.zeros((), jnp.int32)}


def positions_from_mask(attention_mask, start=0, length=None):
    """Token positions for left-padded rows: running count of real slots, minus one.

    attention_mask: [B, S] (1 = real). Returns positions of slots [start, start + length).
    """
    pos = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
    if length is None:
        return pos
    return jax.lax.dynamic_slice_in_dim(pos, start, length, axis=1)


class Attention(nn.Module):
    config: LMConfig

    @nn.compact
    def __call__(self, x, positions, mask, kv, index):
        c = self.config
        common = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        q = Dense((c.num_heads, c.head_dim), ("embed", "heads", "head_dim"),
                  use_bias=c.qkv_bias, name="q_proj", **common)(x)
        k = Dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"),
                  use_bias=c.qkv_bias, name="k_proj", **common)(x)
        v = Dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"),
                  use_bias=c.qkv_bias, name="v_proj", **common)(x)
        inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling_type,
                                 c.rope_scaling_factor, c.rope_low_freq_factor,
                                 c.rope_high_freq_factor, c.rope_original_max_position)
        q = apply_rope(q, positions, inv_freq) * jnp.asarray(c.head_dim ** -0.5, q.dtype)
        k = apply_rope(k, positions, inv_freq)
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", None))
        new_kv = None
        if kv is not None:
            k_all = jax.lax.dynamic_update_slice_in_dim(kv["k"], k.astype(kv["k"].dtype), index, 1)
            v_all = jax.lax.dynamic_update_slice_in_dim(kv["v"], v.astype(kv["v"].dtype), index, 1)
            new_kv = {"k": k_all, "v": v_all}
            k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)
        out = attention(q, k, v, mask)
        out = Dense((c.hidden_size,), ("heads", "head_dim", "embed"), in_dims=2, use_bias=False,
                    name="o_proj", **common)(out)
        return out, new_kv


class MLP(nn.Module):
    config: LMConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        common = dict(dtype=c.dtype, param_dtype=c.param_dtype, use_bias=False)
        gate = Dense((c.intermediate_size,), ("embed", "mlp"), name="gate_proj", **common)(x)
        up = Dense((c.intermediate_size,), ("embed", "mlp"), name="up_proj", **common)(x)
        h = constrain(nn.silu(gate) * up, ("activation_batch", "activation_length",
                                           "activation_mlp"))
        return Dense((c.hidden_size,), ("mlp", "embed"), name="down_proj", **common)(h)


class DecoderBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). Scanned over layers."""

    config: LMConfig

    @nn.compact
    def __call__(self, x, positions, mask, kv, index):
        c = self.config
        norm = dict(eps=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        h, new_kv = Attention(c, name="attn")(RMSNorm(name="input_norm", **norm)(x),
                                              positions, mask, kv, index)
        x = x + h
        x = x + MLP(c, name="mlp")(RMSNorm(name="post_attn_norm", **norm)(x))
        return constrain(x, BTE), new_kv


class CausalLM(nn.Module):
    """Qwen2 / Llama causal LM.

    `apply({"params": p}, input_ids=... | inputs_embeds=..., positions=None,
    attention_mask=None, cache=None, last_logits_only=False)` returns an `LMOutput`.

    - Without a cache, `attention_mask [B, T]` marks real tokens (left padding allowed) and
      positions default to the running count of real tokens.
    - With a cache (see `init_cache`), the chunk is written at `cache["index"]`,
      `attention_mask [B, S]` covers all cache slots (slots not yet written may be 1: causality
      hides them), and the returned cache has `index` advanced by T.
    """

    config: LMConfig

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=to_dtype(c.dtype),
            param_dtype=to_dtype(c.param_dtype),
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                        ("vocab", "embed")))
        block = maybe_remat(DecoderBlock, c.remat_policy)
        self.layers = nn.scan(
            block, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"})(c)
        self.norm = RMSNorm(eps=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        if not c.tie_embeddings:
            self.lm_head = Dense((c.vocab_size,), ("embed", "vocab"), use_bias=False,
                                 dtype=c.dtype, param_dtype=c.param_dtype, kernel_std=0.02)

    def embed(self, input_ids):
        """Token embeddings [B, T, H] in the computation dtype."""
        return self.embed_tokens(input_ids)

    def final_norm(self, x):
        """The norm after the last layer."""
        return self.norm(x)

    def logits(self, hidden):
        """LM head on (final-normed) hidden states, returned in float32."""
        if self.config.tie_embeddings:
            out = self.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        out = constrain(out, ("activation_batch", "activation_length", "activation_vocab"))
        return out.astype(jnp.float32)

    def __call__(self, input_ids=None, inputs_embeds=None, positions=None, attention_mask=None,
                 cache=None, last_logits_only: bool = False, return_logits: bool = True):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        x = constrain(x.astype(to_dtype(self.config.dtype)), BTE)
        b, t = x.shape[:2]

        if cache is None:
            index = jnp.zeros((), jnp.int32)
            s = t
        else:
            index = cache["index"]
            s = cache["k"].shape[2]
        if attention_mask is None:
            attention_mask = jnp.ones((b, s), jnp.int32)
        if attention_mask.shape != (b, s):
            raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected {(b, s)}"
                             f" ({'cache slots' if cache is not None else 'tokens'})")
        if positions is None:
            positions = positions_from_mask(attention_mask, index, t)

        mask = _attend_mask(attention_mask, index, t)

        kv = None if cache is None else {"k": cache["k"], "v": cache["v"]}
        x, new_kv = self.layers(x, positions, mask, kv, index)
        hidden = self.final_norm(x)
        new_cache = None
        if cache is not None:
            new_cache = {"k": new_kv["k"], "v": new_kv["v"], "index": index + t}
        logits = None
        if return_logits:
            logits = self.logits(hidden[:, -1:] if last_logits_only else hidden)
        return LMOutput(logits=logits, hidden_states=hidden, cache=new_cache)


def split_layers(params) -> tuple:
    """Per-layer parameter trees (each a `DecoderBlock`'s) from a CausalLM tree whose
    "layers" arrays are stacked on a leading [L] axis (traceable: static slices)."""
    if "layers" not in params:
        raise KeyError(f"CausalLM params have no 'layers' entry (keys: {sorted(params)})")
    stacked = params["layers"]
    n = {x.shape[0] for x in jax.tree.leaves(stacked)}
    if len(n) != 1:
        raise ValueError(f"stacked layer params disagree on the layer count: {sorted(n)}")
    return tuple(jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n.pop()))


def cache_to_layers(cache: dict) -> dict:
    """{"k", "v": [L, B, S, K, D], "index"} -> {"layers": ({"k", "v": [B, S, K, D]}, ...),
    "index"}: the per-layer cache `forward_unrolled` updates in place."""
    n = cache["k"].shape[0]
    return {"layers": tuple({"k": cache["k"][i], "v": cache["v"][i]} for i in range(n)),
            "index": cache["index"]}


def cache_from_layers(cache: dict) -> dict:
    """Inverse of `cache_to_layers` (the stacked layout `CausalLM.__call__` reads)."""
    return {"k": jnp.stack([c["k"] for c in cache["layers"]]),
            "v": jnp.stack([c["v"] for c in cache["layers"]]), "index": cache["index"]}


def forward_unrolled(config: LMConfig, params, layer_params, *, cache: dict, input_ids=None,
                     inputs_embeds=None, positions=None, attention_mask=None,
                     return_logits: bool = True) -> LMOutput:
    """`CausalLM.__call__` with a cache, layer by layer: equal outputs, per-layer weights
    `layer_params` (from `split_layers(params)`, sliced once outside a decode loop) and a
    per-layer cache (`cache_to_layers`); the returned cache has the same per-layer layout.

    params supplies the embedding, final norm and LM head (its "layers" entry is not read).
    attention_mask [B, S] covers every cache slot; positions default as in `__call__`.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if len(layer_params) != config.num_layers or len(cache["layers"]) != config.num_layers:
        raise ValueError(f"{len(layer_params)} layer param trees and {len(cache['layers'])} "
                         f"cache layers for a {config.num_layers}-layer model")
    model = CausalLM(config)
    x = (model.apply({"params": params}, input_ids, method=CausalLM.embed)
         if inputs_embeds is None else inputs_embeds)
    x = constrain(x.astype(to_dtype(config.dtype)), BTE)
    b, t = x.shape[:2]
    index = cache["index"]
    s = cache["layers"][0]["k"].shape[1]
    if attention_mask is None:
        attention_mask = jnp.ones((b, s), jnp.int32)
    if attention_mask.shape != (b, s):
        raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected {(b, s)} "
                         "(cache slots)")
    if positions is None:
        positions = positions_from_mask(attention_mask, index, t)
    mask = _attend_mask(attention_mask, index, t)
    block = DecoderBlock(config)
    new_layers = []
    for lp, kv in zip(layer_params, cache["layers"]):
        x, new_kv = block.apply({"params": lp}, x, positions, mask, kv, index)
        new_layers.append(new_kv)
    hidden = model.apply({"params": params}, x, method=CausalLM.final_norm)
    logits = None
    if return_logits and config.tie_embeddings:
        # [B, T, H] x [V, H] contracted on H directly (not `Embed.attend`'s dot with the
        # transposed embedding, which XLA (CPU) turned into a copy of it every decode step)
        dtype = to_dtype(config.dtype)
        logits = jax.lax.dot_general(hidden.astype(dtype),
                                     params["embed_tokens"]["embedding"].astype(dtype),
                                     (((2,), (1,)), ((), ())))
        logits = constrain(logits, ("activation_batch", "activation_length",
                                    "activation_vocab")).astype(jnp.float32)
    elif return_logits:
        logits = model.apply({"params": params}, hidden, method=CausalLM.logits)
    return LMOutput(logits=logits, hidden_states=hidden,
                    cache={"layers": tuple(new_layers), "index": index + t})
