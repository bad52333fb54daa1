"""BigVGAN v2 generator: mel [B, n_mels, T] -> waveform [B, T * hop].

Transposed-conv upsampling stages, each followed by anti-aliased multi-periodicity (AMP)
residual blocks whose Snake / SnakeBeta activations run at twice the sample rate (Kaiser-sinc
up- and down-sampling around them) so the periodic nonlinearity does not alias. Weight norm
is folded into plain kernels when loading, so the module holds ordinary conv weights.
Time runs along axis 1 inside ([B, T, C]); the public call keeps BigVGAN's [B, C, T] mel.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from freezeempath_jax.models.configs import BigVGANConfig, to_dtype


def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> np.ndarray:
    """The low-pass FIR of BigVGAN's alias-free activations ([kernel_size], sums to 1)."""
    half = kernel_size // 2
    # Kaiser's empirical attenuation -> beta rule for a transition band of 2 * half_width
    a = 2.285 * (half - 1) * math.pi * 4 * half_width + 7.95
    if a > 50.0:
        beta = 0.1102 * (a - 8.7)
    elif a >= 21.0:
        beta = 0.5842 * (a - 21) ** 0.4 + 0.07886 * (a - 21.0)
    else:
        beta = 0.0
    window = np.kaiser(kernel_size, beta)
    if kernel_size % 2 == 0:
        t = np.arange(-half, half) + 0.5
    else:
        t = np.arange(kernel_size) - half
    f = 2 * cutoff * window * np.sinc(2 * cutoff * t)
    return (f / f.sum()).astype(np.float32)


def conv1d(x, kernel, bias=None, dilation: int = 1, padding: int = 0):
    """x [B, T, Cin], kernel [K, Cin, Cout] (flax layout), zero padding on both sides."""
    y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (1,), [(padding, padding)],
                                     rhs_dilation=(dilation,),
                                     dimension_numbers=("NWC", "WIO", "NWC"))
    return y if bias is None else y + bias.astype(x.dtype)


def conv_transpose1d(x, kernel, bias, stride: int, padding: int):
    """torch ConvTranspose1d semantics (kernel [K, Cin, Cout]), computed polyphase.

    Output sample n = stride * q + s only meets kernel taps of one residue class, so the whole
    transposed conv is one ordinary conv over the input producing `stride` phases as extra
    output channels, instead of a conv over a zero-stuffed input `stride` times longer.
    """
    k, cin, cout = kernel.shape
    b, t, _ = x.shape
    taps = {}  # input offset -> {phase: kernel tap}
    for s in range(stride):
        a, r = divmod(s + padding, stride)
        for j in range((k - r + stride - 1) // stride):
            taps.setdefault(a - j, {})[s] = stride * j + r
    lo, hi = min(taps), max(taps)
    zeros = jnp.zeros((cin, cout), kernel.dtype)
    # combined [offsets, Cin, stride * Cout]: phase s occupies output channels s*Cout..
    w = jnp.stack([jnp.concatenate([kernel[taps[o][s]] if s in taps.get(o, {}) else zeros
                                    for s in range(stride)], axis=-1)
                   for o in range(lo, hi + 1)])
    xp = jnp.pad(x, ((0, 0), (max(0, -lo), max(0, hi)), (0, 0)))
    xp = xp[:, max(0, lo):xp.shape[1] - max(0, -hi)] if lo > 0 or hi < 0 else xp
    y = conv1d(xp, w)  # [B, T, stride * Cout]
    y = y.reshape(b, t * stride, cout)
    # (T - 1) * stride - 2 * padding + K samples; with K = 2 * stride this is T * stride
    n_out = (t - 1) * stride - 2 * padding + k
    if n_out > t * stride:
        raise ValueError(f"transposed conv with kernel {k}, stride {stride}, padding {padding} "
                         "is not supported (output longer than T * stride)")
    return y[:, :n_out] + bias.astype(y.dtype)


def _upsample(x, filt: np.ndarray, ratio: int):
    """BigVGAN's UpSample1d: replicate pad, ratio * conv_transpose with the FIR, crop."""
    k = len(filt)
    pad = k // ratio - 1
    pad_left = pad * ratio + (k - ratio) // 2
    b, t, c = x.shape
    xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)), mode="edge")
    phases = []
    for s in range(ratio):
        m0, r = divmod(s + pad_left, ratio)
        acc = 0.0
        for j in range((k - r + ratio - 1) // ratio):
            acc = acc + xp[:, m0 - j:m0 - j + t] * float(filt[ratio * j + r])
        phases.append(acc)
    return ratio * jnp.stack(phases, axis=2).reshape(b, t * ratio, c)


def _downsample(x, filt: np.ndarray, ratio: int):
    """BigVGAN's DownSample1d: replicate-padded low-pass FIR with stride `ratio`."""
    k = len(filt)
    pad_left, pad_right = k // 2 - int(k % 2 == 0), k // 2
    xp = jnp.pad(x, ((0, 0), (pad_left, pad_right), (0, 0)), mode="edge")
    n = (xp.shape[1] - k) // ratio + 1
    acc = 0.0
    for j in range(k):
        acc = acc + xp[:, j:j + ratio * (n - 1) + 1:ratio] * float(filt[j])
    return acc


class AliasFreeActivation(nn.Module):
    """Snake / SnakeBeta at twice the rate: x + sin^2(a x) / b, a and b per channel."""

    channels: int
    config: BigVGANConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        alpha = self.param("alpha", nn.initializers.zeros, (self.channels,), jnp.float32)
        beta = (self.param("beta", nn.initializers.zeros, (self.channels,), jnp.float32)
                if c.activation == "snakebeta" else alpha)
        if c.snake_logscale:
            alpha, beta = jnp.exp(alpha), jnp.exp(beta)
        filt = kaiser_sinc_filter(0.5 / c.aa_ratio, 0.6 / c.aa_ratio, c.aa_kernel_size)
        x = _upsample(x, filt, c.aa_ratio)
        a, b = alpha.astype(x.dtype), beta.astype(x.dtype)
        x = x + (1.0 / (b + 1e-9)) * jnp.sin(x * a) ** 2
        return _downsample(x, filt, c.aa_ratio)


class _Conv(nn.Module):
    """A Conv1d holding `kernel` [K, Cin, Cout] and optional `bias` (torch's names)."""

    features: int
    kernel_size: int
    dilation: int = 1
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (self.kernel_size, x.shape[-1], self.features), jnp.float32)
        bias = (self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
                if self.use_bias else None)
        pad = (self.kernel_size * self.dilation - self.dilation) // 2
        return conv1d(x, kernel, bias, self.dilation, pad)


class AMPBlock(nn.Module):
    """Residual stack of (activation, dilated conv[, activation, conv]) per dilation."""

    channels: int
    kernel_size: int
    dilations: Sequence[int]
    config: BigVGANConfig

    @nn.compact
    def __call__(self, x):
        two_convs = self.config.resblock == "1"
        n_act = 0
        for j, d in enumerate(self.dilations):
            h = AliasFreeActivation(self.channels, self.config, name=f"act_{n_act}")(x)
            n_act += 1
            h = _Conv(self.channels, self.kernel_size, d, name=f"convs1_{j}")(h)
            if two_convs:
                h = AliasFreeActivation(self.channels, self.config, name=f"act_{n_act}")(h)
                n_act += 1
                h = _Conv(self.channels, self.kernel_size, 1, name=f"convs2_{j}")(h)
            x = x + h
        return x


class BigVGAN(nn.Module):
    """BigVGAN v2 generator. `apply({"params": p}, mel [B, n_mels, T]) -> [B, T * hop]`."""

    config: BigVGANConfig

    @nn.compact
    def __call__(self, mel):
        c = self.config
        dt = to_dtype(c.dtype)
        x = jnp.swapaxes(mel, 1, 2).astype(dt)  # [B, T, n_mels]
        x = _Conv(c.upsample_initial_channel, 7, name="conv_pre")(x)
        n_k = len(c.resblock_kernel_sizes)
        for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes)):
            ch = c.upsample_initial_channel // 2 ** (i + 1)
            kernel = self.param(f"ups_{i}_kernel", nn.initializers.lecun_normal(),
                                (k, x.shape[-1], ch), jnp.float32)
            bias = self.param(f"ups_{i}_bias", nn.initializers.zeros, (ch,), jnp.float32)
            x = conv_transpose1d(x, kernel, bias, u, (k - u) // 2)
            # the AMP blocks of one stage see the same input and are averaged
            xs = sum(AMPBlock(ch, rk, tuple(rd), c, name=f"resblocks_{i * n_k + j}")(x)
                     for j, (rk, rd) in enumerate(zip(c.resblock_kernel_sizes,
                                                      c.resblock_dilation_sizes)))
            x = xs / n_k
        x = AliasFreeActivation(x.shape[-1], c, name="act_post")(x)
        x = _Conv(1, 7, use_bias=c.use_bias_at_final, name="conv_post")(x)
        x = jnp.tanh(x) if c.use_tanh_at_final else jnp.clip(x, -1.0, 1.0)
        return x[..., 0].astype(jnp.float32)
