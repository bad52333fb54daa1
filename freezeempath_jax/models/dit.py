"""IndexTTS2's DiT: the velocity estimator of the conditional flow-matching mel decoder.

One call maps (noisy mel x, prompt mel, semantic condition, style, time t) to dx/dt, all
[B, T, .] time-major. Inside: a merge Linear over [x, prompt, condition, style]; a gpt-fast
style transformer (RMSNorm modulated by the time embedding, interleaved-pair RoPE, SwiGLU,
U-ViT skips from the first half of the layers to the mirrored second half); a long skip that
re-injects x; and a WaveNet tail conditioned on a second time embedding. Padded frames are
masked out of attention (keys) and out of the WaveNet, so rows of different lengths batch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from freezeempath_jax.models.configs import DiTConfig, to_dtype


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of t (scaled by 1000, cos half first) -> Linear, SiLU, Linear."""

    features: int
    frequency_embedding_size: int = 256
    dtype: str = "float32"

    @nn.compact
    def __call__(self, t):
        half = self.frequency_embedding_size // 2
        freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
        args = 1000.0 * t.astype(jnp.float32)[:, None] * freqs[None]
        emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
        dt = to_dtype(self.dtype)
        h = nn.Dense(self.features, dtype=dt, name="mlp_0")(emb.astype(dt))
        return nn.Dense(self.features, dtype=dt, name="mlp_2")(nn.silu(h))


def rms_norm(x, weight, eps: float):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * weight.astype(x.dtype)


class AdaptiveRMSNorm(nn.Module):
    """RMSNorm whose output is scaled and shifted by a projection of the time embedding."""

    eps: float
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x, c):
        d = x.shape[-1]
        weight = self.param("weight", nn.initializers.ones, (d,), jnp.float32)
        y = rms_norm(x, weight, self.eps)
        if c is None:
            return y
        w, b = jnp.split(nn.Dense(2 * d, dtype=to_dtype(self.dtype), name="project_layer")(c),
                         2, axis=-1)
        return w * y + b


def rope(x, positions, base: float):
    """Rotary embedding on adjacent pairs (x[2i], x[2i+1]) as gpt-fast applies it.
    x [B, T, H, D], positions [T]."""
    d = x.shape[-1]
    freqs = 1.0 / (base ** (jnp.arange(0, d, 2, dtype=jnp.float32)[: d // 2] / d))
    ang = positions.astype(jnp.float32)[:, None] * freqs[None]  # [T, D/2]
    cos, sin = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]
    xp = x.astype(jnp.float32).reshape(*x.shape[:-1], d // 2, 2)
    out = jnp.stack([xp[..., 0] * cos - xp[..., 1] * sin,
                     xp[..., 1] * cos + xp[..., 0] * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


class _Block(nn.Module):
    config: DiTConfig
    receives_skip: bool

    @nn.compact
    def __call__(self, x, c, positions, key_mask, skip=None):
        cfg = self.config
        dt = to_dtype(cfg.dtype)
        h_, hd = cfg.num_heads, cfg.head_dim
        if self.receives_skip:
            x = nn.Dense(cfg.hidden_dim, dtype=dt, name="skip_in_linear")(
                jnp.concatenate([x, skip], axis=-1))
        h = AdaptiveRMSNorm(cfg.norm_eps, cfg.dtype, name="attention_norm")(x, c)
        qkv = nn.Dense(3 * h_ * hd, use_bias=False, dtype=dt, name="wqkv")(h)
        q, k, v = (a.reshape(*a.shape[:2], h_, hd) for a in jnp.split(qkv, 3, axis=-1))
        q, k = rope(q, positions, cfg.rope_base), rope(k, positions, cfg.rope_base)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(hd, dt))
        s = jnp.where(key_mask[:, None, None, :], s, jnp.finfo(s.dtype).min)
        a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)
        x = x + nn.Dense(cfg.hidden_dim, use_bias=False, dtype=dt, name="wo")(
            a.reshape(*a.shape[:2], h_ * hd))
        h = AdaptiveRMSNorm(cfg.norm_eps, cfg.dtype, name="ffn_norm")(x, c)
        f = cfg.intermediate_size
        g = nn.silu(nn.Dense(f, use_bias=False, dtype=dt, name="w1")(h))
        g = g * nn.Dense(f, use_bias=False, dtype=dt, name="w3")(h)
        return x + nn.Dense(cfg.hidden_dim, use_bias=False, dtype=dt, name="w2")(g)


def reflect_pad_rows(x, lens, pad: int):
    """Reflect-pads each row at its own end ([B, T, C] -> [B, T + 2 pad, C]): what torch's
    reflect padding gives a row of length `lens[b]` alone, whatever follows it here."""
    t = x.shape[1]
    pos = jnp.arange(-pad, t + pad)[None, :]
    last = (lens[:, None] - 1).astype(pos.dtype)
    idx = jnp.where(pos < 0, -pos, jnp.where(pos > last, 2 * last - pos, pos))
    idx = jnp.clip(idx, 0, t - 1)
    return jnp.take_along_axis(x, idx[..., None], axis=1)


class WaveNet(nn.Module):
    """Non-causal gated WaveNet (VITS style) with a global condition g and reflect padding."""

    config: DiTConfig

    @nn.compact
    def __call__(self, x, lens, mask, g):
        cfg = self.config
        dt = to_dtype(cfg.dtype)
        hid, n, k = cfg.wavenet_hidden_dim, cfg.wavenet_num_layers, cfg.wavenet_kernel_size
        g = nn.Dense(2 * hid * n, dtype=dt, name="cond_layer")(g)[:, None, :]  # [B, 1, 2hLn]
        out = jnp.zeros_like(x)
        for i in range(n):
            d = cfg.wavenet_dilation_rate ** i
            pad = (k - 1) * d // 2
            kernel = self.param(f"in_layers_{i}_kernel", nn.initializers.lecun_normal(),
                                (k, hid, 2 * hid), jnp.float32)
            bias = self.param(f"in_layers_{i}_bias", nn.initializers.zeros, (2 * hid,),
                              jnp.float32)
            xp = reflect_pad_rows(x, lens, pad)
            h = jax.lax.conv_general_dilated(xp, kernel.astype(dt), (1,), [(0, 0)],
                                             rhs_dilation=(d,),
                                             dimension_numbers=("NWC", "WIO", "NWC"))
            h = h + bias.astype(dt) + g[..., 2 * hid * i:2 * hid * (i + 1)]
            acts = jnp.tanh(h[..., :hid]) * jax.nn.sigmoid(h[..., hid:])
            last = i == n - 1
            rs = nn.Dense(hid if last else 2 * hid, dtype=dt, name=f"res_skip_layers_{i}")(acts)
            if last:
                out = out + rs
            else:
                x = (x + rs[..., :hid]) * mask
                out = out + rs[..., hid:]
        return out * mask


class DiT(nn.Module):
    """`apply(p, x, prompt_x, lens, t, style, cond) -> dx/dt`: x, prompt_x [B, T, in_channels],
    lens [B] valid frames per row, t [B], style [B, style_dim], cond [B, T, content_dim]."""

    config: DiTConfig

    @nn.compact
    def __call__(self, x, prompt_x, lens, t, style, cond):
        cfg = self.config
        dt = to_dtype(cfg.dtype)
        x, prompt_x = x.astype(dt), prompt_x.astype(dt)
        b, n, _ = x.shape
        t1 = TimestepEmbedder(cfg.hidden_dim, cfg.frequency_embedding_size, cfg.dtype,
                              name="t_embedder")(t)
        cond = nn.Dense(cfg.hidden_dim, dtype=dt, name="cond_projection")(cond.astype(dt))
        parts = [x, prompt_x, cond]
        if cfg.style_condition and not cfg.style_as_token:
            parts.append(jnp.broadcast_to(style.astype(dt)[:, None, :], (b, n, style.shape[-1])))
        h = nn.Dense(cfg.hidden_dim, dtype=dt, name="cond_x_merge_linear")(
            jnp.concatenate(parts, axis=-1))
        extra = []  # tokens put in front of the frames (in this order: time, style)
        if cfg.style_as_token:
            extra.append(nn.Dense(cfg.hidden_dim, dtype=dt, name="style_in")(style.astype(dt)))
        if cfg.time_as_token:
            extra.insert(0, t1)
        if extra:
            h = jnp.concatenate([e[:, None, :] for e in extra] + [h], axis=1)
        n_tok = h.shape[1]
        key_mask = jnp.arange(n_tok)[None, :] < (lens + len(extra))[:, None]
        positions = jnp.arange(n_tok)
        c = None if cfg.time_as_token else t1[:, None, :]
        skips = []
        half = cfg.depth // 2
        for i in range(cfg.depth):
            receives = cfg.uvit_skip_connection and i > half
            h = _Block(cfg, receives, name=f"layers_{i}")(
                h, c, positions, key_mask, skips.pop() if receives else None)
            if cfg.uvit_skip_connection and i < half:
                skips.append(h)
        h = AdaptiveRMSNorm(cfg.norm_eps, cfg.dtype, name="norm")(h, t1[:, None, :])
        h = h[:, len(extra):]
        if cfg.long_skip_connection:
            h = nn.Dense(cfg.hidden_dim, dtype=dt, name="skip_linear")(
                jnp.concatenate([h, x], axis=-1))
        if cfg.final_layer_type == "wavenet":
            mask = (jnp.arange(n)[None, :] < lens[:, None]).astype(dt)[..., None]
            y = nn.Dense(cfg.wavenet_hidden_dim, dtype=dt, name="conv1")(h)
            t2 = TimestepEmbedder(cfg.wavenet_hidden_dim, cfg.frequency_embedding_size,
                                  cfg.dtype, name="t_embedder2")(t)
            y = WaveNet(cfg, name="wavenet")(y, lens, mask, t2)
            y = y + nn.Dense(cfg.wavenet_hidden_dim, dtype=dt, name="res_projection")(h)
            # final layer: adaLN-modulated LayerNorm (no affine) + Linear, then a 1x1 conv
            shift, scale = jnp.split(nn.Dense(2 * cfg.wavenet_hidden_dim, dtype=dt,
                                              name="final_adaLN_modulation")(nn.silu(t1)), 2, -1)
            y = nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=dt,
                             name="final_norm")(y)
            y = y * (1 + scale[:, None]) + shift[:, None]
            y = nn.Dense(cfg.wavenet_hidden_dim, dtype=dt, name="final_linear")(y)
            return nn.Dense(cfg.in_channels, dtype=dt, name="conv2")(y)
        y = nn.silu(nn.Dense(cfg.hidden_dim, dtype=dt, name="final_mlp_0")(h))
        return nn.Dense(cfg.in_channels, dtype=dt, name="final_mlp_2")(y)
