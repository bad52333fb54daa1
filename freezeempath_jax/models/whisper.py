"""Whisper audio encoder that also exposes every block's output (the emotion extractor reads
all of them, taken before the final LayerNorm)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from freezeempath_jax.models.configs import WhisperConfig, to_dtype
from freezeempath_jax.models.layers import Dense, attention, layer_norm, maybe_remat
from freezeempath_jax.sharding import constrain

BTD = ("activation_batch", "activation_length", "activation_embed")


@struct.dataclass
class WhisperOutput:
    last_hidden_state: jax.Array  # [B, T, d], after ln_post
    layer_states: jax.Array  # [L, B, T, d], each block's output before ln_post


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's fixed positional table [length, channels]: sin half then cos half."""
    inc = np.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-inc * np.arange(channels // 2))
    t = np.arange(length)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


class _Block(nn.Module):
    """Nests attention/MLP params under `attn/` and `mlp/` as docs/params.md lays them out."""

    config: WhisperConfig

    @nn.compact
    def __call__(self, x, _):
        c = self.config
        common = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        x = x + _SelfAttention(c, name="attn")(layer_norm("attn_ln", c.layer_norm_eps, **common)(x))
        x = x + _MLP(c, name="mlp")(layer_norm("mlp_ln", c.layer_norm_eps, **common)(x))
        x = constrain(x, BTD)
        return x, x


class _SelfAttention(nn.Module):
    config: WhisperConfig

    @nn.compact
    def __call__(self, h):
        c = self.config
        common = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        hd = c.d_model // c.num_heads
        axes = ("audio_embed", "audio_heads", "head_dim")
        q = Dense((c.num_heads, hd), axes, name="q_proj", **common)(h)
        k = Dense((c.num_heads, hd), axes, use_bias=False, name="k_proj", **common)(h)
        v = Dense((c.num_heads, hd), axes, name="v_proj", **common)(h)
        q = q * jnp.asarray(hd ** -0.5, q.dtype)
        a = attention(q, k, v, jnp.ones((1, 1, 1, 1), bool))
        return Dense((c.d_model,), ("audio_heads", "head_dim", "audio_embed"), in_dims=2,
                     name="out_proj", **common)(a)


class _MLP(nn.Module):
    config: WhisperConfig

    @nn.compact
    def __call__(self, h):
        c = self.config
        common = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        h = Dense((c.mlp_dim,), ("audio_embed", "audio_mlp"), name="fc1", **common)(h)
        h = constrain(nn.gelu(h, approximate=False),
                      ("activation_batch", "activation_length", "activation_mlp"))
        return Dense((c.d_model,), ("audio_mlp", "audio_embed"), name="fc2", **common)(h)


class WhisperEncoder(nn.Module):
    """Whisper encoder for any size (tiny.en 80-mel ... large-v3 128-mel).

    `apply({"params": p}, mel)` with mel `[B, n_mels, frames]` returns a `WhisperOutput`.
    Frames must be 2 * max_source_positions (30 s) unless `config.allow_short_inputs`, in which
    case the positional table is sliced to the input length.
    """

    config: WhisperConfig

    @nn.compact
    def __call__(self, mel):
        c = self.config
        dtype, pdtype = to_dtype(c.dtype), to_dtype(c.param_dtype)
        if mel.ndim != 3 or mel.shape[1] != c.n_mels:
            raise ValueError(f"mel must be [B, {c.n_mels}, frames], got {mel.shape}")
        x = jnp.swapaxes(mel, 1, 2).astype(dtype)  # [B, F, n_mels]
        conv = dict(dtype=dtype, param_dtype=pdtype, kernel_size=(3,), padding=((1, 1),))
        x = nn.gelu(nn.Conv(c.d_model, name="conv1", kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("conv_k", "mel", "audio_embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("audio_embed",)),
            **conv)(x), approximate=False)
        x = nn.gelu(nn.Conv(c.d_model, strides=(2,), name="conv2",
                            kernel_init=nn.with_logical_partitioning(
                                nn.initializers.lecun_normal(),
                                ("conv_k", "audio_embed", "audio_embed")),
                            bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   ("audio_embed",)),
                            **conv)(x), approximate=False)
        t = x.shape[1]
        if t > c.max_source_positions or (t != c.max_source_positions
                                          and not c.allow_short_inputs):
            raise ValueError(
                f"mel has {mel.shape[2]} frames -> {t} positions; the encoder expects "
                f"{c.max_source_positions} (30 s). Pad with log_mel_spectrogram's default, or set "
                f"allow_short_inputs=True for shorter inputs.")
        pos = self.param("embed_positions", nn.with_logical_partitioning(
            lambda _, shape, dt: jnp.asarray(sinusoids(*shape), dt), ("positions", "audio_embed")),
            (c.max_source_positions, c.d_model), pdtype)
        x = constrain(x + pos[:t].astype(dtype), BTD)

        block = maybe_remat(_Block, c.remat_policy)
        x, states = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=nn.broadcast, length=c.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"},
                            )(c, name="layers")(x, None)
        last = layer_norm("ln_post", c.layer_norm_eps, c.dtype, c.param_dtype)(x)
        return WhisperOutput(last_hidden_state=last, layer_states=states)
