"""Building blocks shared by the Whisper encoder and the causal LMs.

Every parameter is declared with its logical axis names (see `freezeempath_jax.sharding`), so
sharding is decided by config rules, never inside a layer.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from freezeempath_jax.models.configs import to_dtype

# Large finite negative instead of -inf: fully-masked rows (left padding) stay finite.
NEG_INF = -1e30

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "everything": jax.checkpoint_policies.everything_saveable,
}


def maybe_remat(block_cls, policy: str):
    """Wraps a block class in `nn.remat` with a named policy ("none" leaves it alone)."""
    if policy in (None, "none", ""):
        return block_cls
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; choose from "
                         f"{['none', *REMAT_POLICIES]}")
    return nn.remat(block_cls, policy=REMAT_POLICIES[policy], prevent_cse=False)


class Dense(nn.Module):
    """Linear map contracting the last `in_dims` input axes into `features` (any rank).

    kernel shape = input_shape[-in_dims:] + features; torch `Linear.weight [out, in]` is its
    transpose (reshaped for multi-head projections).
    """

    features: Tuple[int, ...]
    axes: Tuple[str, ...]  # logical names for kernel dims (inputs then outputs)
    in_dims: int = 1
    use_bias: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    kernel_std: Optional[float] = None  # None: fan-in scaled truncated normal

    @nn.compact
    def __call__(self, x):
        feats = tuple(self.features) if isinstance(self.features, Sequence) else (self.features,)
        in_shape = x.shape[-self.in_dims:]
        kshape = tuple(in_shape) + feats
        if len(self.axes) != len(kshape):
            raise ValueError(f"{self.name}: {len(self.axes)} axis names for kernel {kshape}")
        if self.kernel_std is None:
            init = nn.initializers.variance_scaling(
                1.0, "fan_in", "truncated_normal", in_axis=tuple(range(self.in_dims)),
                out_axis=tuple(range(self.in_dims, len(kshape))))
        else:
            init = nn.initializers.normal(self.kernel_std)
        kernel = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.axes)),
                            kshape, to_dtype(self.param_dtype))
        dtype = to_dtype(self.dtype)
        n = self.in_dims
        y = jax.lax.dot_general(
            x.astype(dtype), kernel.astype(dtype),
            ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ())))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(
                nn.initializers.zeros, tuple(self.axes[n:])), feats, to_dtype(self.param_dtype))
            y = y + bias.astype(dtype)
        return y


class RMSNorm(nn.Module):
    """y = scale * x / rms(x), statistics in float32 (Hugging Face Qwen2/Llama convention)."""

    eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), to_dtype(self.param_dtype))
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        dtype = to_dtype(self.dtype)
        return scale.astype(dtype) * xf.astype(dtype)


def layer_norm(name: str, eps: float, dtype: str, param_dtype: str) -> nn.LayerNorm:
    """LayerNorm with logically-annotated scale/bias."""
    return nn.LayerNorm(
        epsilon=eps, dtype=to_dtype(dtype), param_dtype=to_dtype(param_dtype), name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def attention(q, k, v, mask):
    """Softmax attention with grouped-query support, softmax in float32.

    q: [B, T, N, D] (already scaled), k, v: [B, S, K, D] with N % K == 0,
    mask: bool broadcastable to [B, 1, T, S] (True = attend). Returns [B, T, N, D].
    """
    b, t, n, d = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, :, None] if mask.ndim == 4 else mask, logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, n, d)


def rope_inv_freq(head_dim: int, theta: float, scaling_type: Optional[str] = None,
                  factor: float = 1.0, low_freq_factor: float = 1.0,
                  high_freq_factor: float = 4.0, original_max_position: int = 8192) -> np.ndarray:
    """Inverse RoPE frequencies [head_dim/2] (float32), with linear or llama3 scaling."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    inv = inv.astype(np.float32)
    if scaling_type in (None, "default", "none"):
        return inv
    if scaling_type == "linear":
        return (inv / factor).astype(np.float32)
    if scaling_type == "llama3":
        wavelen = 2 * np.pi / inv
        low_wl = original_max_position / low_freq_factor
        high_wl = original_max_position / high_freq_factor
        scaled = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (original_max_position / wavelen - low_freq_factor) / (
            high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope scaling type {scaling_type!r} (none, linear, llama3)")


def apply_rope(x, positions, inv_freq):
    """Rotary embedding, half-split layout (Hugging Face `rotate_half`).

    x: [B, T, N, D], positions: int [B, T], inv_freq: [D/2].
    """
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x.dtype)
