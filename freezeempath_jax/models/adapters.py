"""Speech adapters: map Whisper's final hidden states [B, T, d] into the LLM's space [B, S, H].

- `FrameConcatProjector` ("linear", the released FreezeEmpath projector): k consecutive frames
  are concatenated into one vector, then Linear -> ReLU -> Linear. 1500 frames -> 300 tokens.
- `ConvAdapter` ("conv", BLSP-Emo style): stride-2 Conv1d + GLU layers, then a Linear map.
  Three layers give 1500 -> 750 -> 375 -> 188 tokens.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from freezeempath_jax.models.configs import ProjectorConfig, to_dtype
from freezeempath_jax.models.layers import Dense
from freezeempath_jax.sharding import constrain

BTE = ("activation_batch", "activation_length", "activation_embed")


class FrameConcatProjector(nn.Module):
    """[B, T, d] -> [B, T // k, out_dim].

    Trailing `T mod k` frames are dropped; frames t*k .. t*k+k-1 are concatenated in time order
    (torch `x.view(B, T // k, k * d)` on a contiguous tensor), so linear1's input index is
    `j * d + c` for frame offset j and channel c.
    """

    config: ProjectorConfig
    out_dim: int
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    @nn.compact
    def __call__(self, x):
        c = self.config
        if x.ndim != 3:
            raise ValueError(f"FrameConcatProjector expects [B, T, d], got shape {x.shape}")
        b, t, d = x.shape
        if c.k < 1:
            raise ValueError(f"ProjectorConfig.k must be >= 1, got {c.k}")
        if t < c.k:
            raise ValueError(f"FrameConcatProjector: {t} frames is fewer than k={c.k}")
        s = t // c.k
        x = x[:, : s * c.k].reshape(b, s, c.k * d)
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Dense((c.hidden_dim,), ("adapter_in", "adapter_hidden"), name="linear1", **common)(x)
        h = constrain(nn.relu(h), ("activation_batch", "activation_length", "activation_mlp"))
        y = Dense((self.out_dim,), ("adapter_hidden", "embed"), name="linear2", **common)(h)
        return constrain(y, BTE)


def glu(x, axis: int = -1):
    """Gated linear unit: first half * sigmoid(second half) along `axis` (torch F.glu)."""
    a, g = jnp.split(x, 2, axis=axis)
    return a * jax.nn.sigmoid(g)


def conv_output_length(length: int, config: ProjectorConfig) -> int:
    """Frames left after the ConvAdapter's stride-`conv_stride` convolutions (pad kernel // 2)."""
    pad = config.conv_kernel // 2
    for _ in range(config.conv_layers):
        length = (length + 2 * pad - config.conv_kernel) // config.conv_stride + 1
    return length


class ConvAdapter(nn.Module):
    """BLSP-Emo style adapter: `conv_layers` x (Conv1d(kernel, stride, pad kernel//2) -> 2C
    channels, GLU -> C), then `proj` Linear(C -> out_dim). C = conv_channels or the encoder
    width. Parameters `conv_{i}` (flax Conv layout [width, in, out]) and `proj`.
    """

    config: ProjectorConfig
    out_dim: int
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    @nn.compact
    def __call__(self, x):
        c = self.config
        if x.ndim != 3:
            raise ValueError(f"ConvAdapter expects [B, T, d], got shape {x.shape}")
        if c.conv_layers < 1:
            raise ValueError(f"ProjectorConfig.conv_layers must be >= 1, got {c.conv_layers}")
        channels = c.conv_channels or x.shape[-1]
        dtype, pdtype = to_dtype(self.dtype), to_dtype(self.param_dtype)
        pad = c.conv_kernel // 2
        h = x.astype(dtype)
        for i in range(c.conv_layers):
            h = nn.Conv(
                2 * channels, (c.conv_kernel,), strides=(c.conv_stride,), padding=[(pad, pad)],
                dtype=dtype, param_dtype=pdtype, name=f"conv_{i}",
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), ("conv_k", "adapter_in", "adapter_hidden")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                       ("adapter_hidden",)))(h)
            h = glu(h, axis=-1)
            h = constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
        y = Dense((self.out_dim,), ("adapter_hidden", "embed"), name="proj", dtype=self.dtype,
                  param_dtype=self.param_dtype)(h)
        return constrain(y, BTE)


PROJECTORS = {"linear": FrameConcatProjector, "conv": ConvAdapter}


def make_projector(config: ProjectorConfig, out_dim: int, dtype: Any = "float32",
                   param_dtype: Any = "float32", name=None) -> nn.Module:
    """The speech adapter named by `config.type` ("linear" or "conv").

    `name` stays None when the result is assigned in a parent's `setup` (the attribute names
    it); pass a name when building it inside an `nn.compact` method.
    """
    if config.type not in PROJECTORS:
        raise ValueError(f"ProjectorConfig.type {config.type!r} is unknown; choose one of "
                         f"{sorted(PROJECTORS)}")
    return PROJECTORS[config.type](config, out_dim, dtype, param_dtype, name=name)
