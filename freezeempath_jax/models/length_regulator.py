"""IndexTTS2's length regulator (InterpolateRegulator, continuous input, no f0): codec
features at the unit rate -> conditioning at the mel frame rate.

Project 1024 -> 512, stretch to the target frame count by nearest-neighbour interpolation,
then (Conv1d k3, GroupNorm, Mish) blocks and a 1x1 conv. Rows of a batch may have different
lengths: every statistic and every conv input is masked to the row's own frames, so a padded
row gives exactly what the reference gives for that row alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from freezeempath_jax.models.configs import LengthRegulatorConfig, to_dtype


def nearest_indices(in_lens, out_lens, n_out: int):
    """[B, n_out] source index of each output frame, as torch's `interpolate(mode="nearest")`
    computes it: floor(i * (in / out)) in float32, clipped to the last input frame."""
    scale = in_lens.astype(jnp.float32) / out_lens.astype(jnp.float32)
    i = jnp.arange(n_out, dtype=jnp.float32)
    idx = jnp.floor(i[None, :] * scale[:, None]).astype(jnp.int32)
    return jnp.minimum(idx, in_lens[:, None].astype(jnp.int32) - 1)


def masked_group_norm(x, mask, groups: int, scale, bias, eps: float):
    """GroupNorm over the valid frames only. x [B, T, C], mask [B, T, 1] (float)."""
    b, t, ch = x.shape
    xg = x.reshape(b, t, groups, ch // groups)
    m = mask[..., None]  # [B, T, 1, 1]
    count = jnp.sum(mask, axis=1)[:, None, :] * (ch // groups)  # [B, 1, 1]
    mean = jnp.sum(xg * m, axis=(1, 3), keepdims=True) / count[..., None]
    var = jnp.sum(((xg - mean) * m) ** 2, axis=(1, 3), keepdims=True) / count[..., None]
    y = ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(b, t, ch)
    return y * scale + bias


class LengthRegulator(nn.Module):
    """`apply(p, x [B, T_in, in_channels], in_lens [B], out_lens [B], n_out)` ->
    [B, n_out, channels], zero beyond each row's `out_lens`."""

    config: LengthRegulatorConfig

    @nn.compact
    def __call__(self, x, in_lens, out_lens, n_out: int):
        c = self.config
        dt = to_dtype(c.dtype)
        x = nn.Dense(c.channels, dtype=dt, name="content_in_proj")(x.astype(dt))
        idx = nearest_indices(in_lens, out_lens, n_out)
        x = jnp.take_along_axis(x, idx[..., None], axis=1)  # [B, n_out, channels]
        mask = (jnp.arange(n_out)[None, :] < out_lens[:, None]).astype(dt)[..., None]
        for i, _ in enumerate(c.sampling_ratios):
            # zeroed padding frames make the k3 conv see what torch's zero padding shows
            x = nn.Conv(c.channels, (3,), padding=[(1, 1)], dtype=dt, name=f"conv_{i}")(x * mask)
            scale = self.param(f"norm_{i}_scale", nn.initializers.ones, (c.channels,), jnp.float32)
            bias = self.param(f"norm_{i}_bias", nn.initializers.zeros, (c.channels,), jnp.float32)
            x = masked_group_norm(x, mask, c.groups, scale.astype(dt), bias.astype(dt),
                                  c.group_norm_eps)
            x = x * jnp.tanh(jax.nn.softplus(x))  # Mish
        x = nn.Dense(c.out_channels or c.channels, dtype=dt, name="conv_out")(x)
        return x * mask
