"""The demo's unit codec: 16 kHz speech <-> discrete units at 50 Hz, fitted in seconds.

The release turns speech into 8192 semantic-codec units and back with an IndexTTS2 chain
(`models.unit_decoder`); nothing of that size can be fitted on the CPU demo's budget, so the
demo speaks through this small codec instead (same role: units in, waveform out):

    encode   audio [B, N] -> STFT (n_fft, hop 160, periodic Hann) -> |S| [B, F, n_fft/2+1]
             -> log(|S| + floor) -> pairs of frames [B, T, 2 (n_fft/2+1)] (T = N / 320:
             50 Hz) -> nearest codeword of `codebook` [K, D]       -> units [B, T]
    decode   units [B, T] -> `spectra` [K, 2, n_fft/2+1] (each unit's fitted log-magnitudes)
             -> [B, 2T, n_fft/2+1] -> fast Griffin-Lim (momentum 0.99) -> waveform [B, 320 T]

`codebook` is k-means over the analysis features of a corpus; `spectra` the mean
log-magnitude frames of the frames each codeword took (`fit`). With `feature="mel"` the
codebook lives on log-mel frames instead (the decoder still maps to log-magnitudes).

The modules are plain linen (`apply({"params": p}, ..., method=...)`); the host helpers
`encode_audio` / `decode_units` / `stream_decode` batch by length bucket under jit, check
units per utterance (out of range or empty -> ValueError naming it), and are a pure function
of (params, input, seed): each utterance draws its Griffin-Lim start phase from
fold_in(key(seed), utterance), padding depends only on its own length.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable, Iterator, List, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from freezeempath_jax.models.configs import UnitCodecConfig

MOMENTUM = 0.99  # fast Griffin-Lim (Perraudin et al. 2013)


def _window(n_fft: int) -> jnp.ndarray:
    n = jnp.arange(n_fft, dtype=jnp.float32)
    return 0.5 - 0.5 * jnp.cos(2.0 * jnp.pi * n / n_fft)  # periodic Hann


def _frame_index(frames: int, c: UnitCodecConfig) -> jnp.ndarray:
    return jnp.arange(frames)[:, None] * c.hop + jnp.arange(c.n_fft)[None, :]


def stft(c: UnitCodecConfig, audio: jnp.ndarray, frames: int) -> jnp.ndarray:
    """Complex STFT [B, frames, n_fft/2+1] of audio [B, N], frame f centred on sample f*hop
    (reflect-free zero padding of n_fft/2 at both ends)."""
    pad = c.n_fft // 2
    need = (frames - 1) * c.hop + c.n_fft
    x = jnp.pad(audio, ((0, 0), (pad, max(0, need - audio.shape[1] - pad))))
    return jnp.fft.rfft(x[:, _frame_index(frames, c)] * _window(c.n_fft), axis=-1)


def istft(c: UnitCodecConfig, spec: jnp.ndarray, n: int) -> jnp.ndarray:
    """Least-squares inverse of `stft` (weighted overlap-add): [B, F, bins] -> [B, n]."""
    b, f, _ = spec.shape
    w = _window(c.n_fft)
    frames = jnp.fft.irfft(spec, n=c.n_fft, axis=-1) * w  # [B, F, n_fft]
    length = (f - 1) * c.hop + c.n_fft
    idx = _frame_index(f, c).reshape(-1)
    y = jnp.zeros((b, length), frames.dtype).at[:, idx].add(frames.reshape(b, -1))
    norm = jnp.zeros((length,), w.dtype).at[idx].add(jnp.tile(w * w, f))
    y = y / jnp.maximum(norm, 1e-6)
    pad = c.n_fft // 2
    return y[:, pad:pad + n]


def feature_dim(c: UnitCodecConfig) -> int:
    """Width D of one unit's analysis feature (frames_per_unit frames)."""
    per_frame = c.n_fft // 2 + 1 if c.feature == "logmag" else c.n_mels
    return c.frames_per_unit * per_frame


def _mel_matrix(c: UnitCodecConfig) -> np.ndarray:
    from freezeempath_jax.audio import _mel_filters_cached

    return np.asarray(_mel_filters_cached(c.n_mels, c.sampling_rate, c.n_fft,
                                          c.sampling_rate / 2.0), np.float32)


class UnitCodec(nn.Module):
    """Parameters `codebook` [K, D] (analysis space) and `spectra` [K, frames_per_unit,
    n_fft/2+1] (log-magnitude frames each unit speaks as). Methods: `features`, `encode`,
    `spectrogram`, `decode`."""

    config: UnitCodecConfig

    def setup(self):
        c = self.config
        if c.feature not in ("logmag", "mel"):
            raise ValueError(f"UnitCodecConfig.feature {c.feature!r}: choose 'logmag' or 'mel'")
        bins = c.n_fft // 2 + 1
        self.codebook = self.param("codebook", nn.initializers.normal(1.0),
                                   (c.codebook_size, feature_dim(c)))
        self.spectra = self.param("spectra", nn.initializers.normal(1.0),
                                  (c.codebook_size, c.frames_per_unit, bins))

    def features(self, audio):
        """audio [B, N] (N a multiple of hop * frames_per_unit) -> [B, T, D]."""
        c = self.config
        t = audio.shape[1] // (c.hop * c.frames_per_unit)
        mag = jnp.abs(stft(c, audio.astype(jnp.float32), t * c.frames_per_unit))
        if c.feature == "mel":
            mag = mag @ jnp.asarray(_mel_matrix(c)).T
        return jnp.log(mag + c.floor).reshape(audio.shape[0], t, -1)

    def encode(self, audio):
        """audio [B, N] -> units [B, N / (hop * frames_per_unit)] int32 (nearest codeword)."""
        x = self.features(audio)
        cb = self.codebook
        d = (jnp.sum(cb * cb, -1)[None, None] - 2.0 * jnp.einsum("btd,kd->btk", x, cb))
        return jnp.argmin(d, axis=-1).astype(jnp.int32)

    def spectrogram(self, units):
        """units [B, T] -> log-magnitude frames [B, T * frames_per_unit, bins]."""
        s = jnp.take(self.spectra, units, axis=0)  # [B, T, fpu, bins]
        return s.reshape(units.shape[0], -1, s.shape[-1])

    def decode(self, units, keys):
        """units [B, T] and one PRNG key per row -> waveform [B, T * hop * frames_per_unit]
        (fast Griffin-Lim from a random start phase drawn from the row's key)."""
        c = self.config
        mag = jnp.exp(self.spectrogram(units))
        b, f, bins = mag.shape
        n = f * c.hop
        phase = jax.vmap(lambda k: jax.random.uniform(k, (f, bins), maxval=2 * jnp.pi))(keys)
        spec = mag * jnp.exp(1j * phase)

        def body(_, carry):
            spec, prev = carry
            proj = stft(c, istft(c, spec, n), f)
            acc = proj + MOMENTUM * (proj - prev)
            return mag * jnp.exp(1j * jnp.angle(acc)), proj

        spec, _ = jax.lax.fori_loop(0, c.griffin_lim_iters, body, (spec, spec))
        return istft(c, spec, n)


def init_params(config: UnitCodecConfig, key):
    """Random parameters (for tests); `fit` gives real ones."""
    return UnitCodec(config).init(key, jnp.zeros((1, 4), jnp.int32),
                                  method=UnitCodec.spectrogram)["params"]


def samples_per_unit(config: UnitCodecConfig) -> int:
    return config.hop * config.frames_per_unit


@functools.partial(jax.jit, static_argnums=0)
def _encode_jit(config, params, audio):
    return UnitCodec(config).apply({"params": params}, audio, method=UnitCodec.encode)


@functools.partial(jax.jit, static_argnums=0)
def _features_jit(config, params, audio):
    return UnitCodec(config).apply({"params": params}, audio, method=UnitCodec.features)


@functools.partial(jax.jit, static_argnums=0)
def _decode_jit(config, params, units, keys):
    wav = UnitCodec(config).apply({"params": params}, units, keys, method=UnitCodec.decode)
    return jnp.clip(wav, -1.0, 1.0)


def _bucket(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _batches(lengths: Sequence[int], multiple: int, batch_size: int):
    """(bucket length, [indices]) groups of at most batch_size (padded to a power of two)."""
    by = {}
    for i, n in enumerate(lengths):
        by.setdefault(_bucket(n, multiple), []).append(i)
    for t, idx in sorted(by.items()):
        for s in range(0, len(idx), batch_size):
            yield t, idx[s:s + batch_size]


def _width(n: int) -> int:
    return 1 << (n - 1).bit_length()


def encode_audio(config: UnitCodecConfig, params, clips: Sequence[np.ndarray],
                 batch_size: int = 8) -> List[np.ndarray]:
    """16 kHz float clips -> unit arrays (int64), one per clip, len(clip) // 320 units each
    (a trailing partial unit is dropped). A clip shorter than one unit -> ValueError."""
    spu = samples_per_unit(config)
    clips = [np.asarray(c, np.float32).reshape(-1) for c in clips]
    for i, c in enumerate(clips):
        if len(c) < spu:
            raise ValueError(f"clip {i}: {len(c)} samples, shorter than one unit ({spu})")
    lens = [len(c) // spu for c in clips]
    out: List[Optional[np.ndarray]] = [None] * len(clips)
    for t, group in _batches(lens, config.length_bucket, batch_size):
        x = np.zeros((_width(len(group)), t * spu), np.float32)
        for r, i in enumerate(group):
            x[r, :lens[i] * spu] = clips[i][:lens[i] * spu]
        u = np.asarray(_encode_jit(config, params, jnp.asarray(x)))
        for r, i in enumerate(group):
            out[i] = u[r, :lens[i]].astype(np.int64)
    return out


def check_units(config: UnitCodecConfig, units, what: str = "units") -> np.ndarray:
    """Units as a 1-D int64 array; ValueError naming the problem when empty or outside
    [0, codebook_size)."""
    try:
        u = np.asarray(units, np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: not a sequence of integers ({e})") from None
    if u.size == 0:
        raise ValueError(f"{what}: empty (no speech units to decode)")
    if not np.all(np.isfinite(u)) or np.any(u != np.round(u)):
        raise ValueError(f"{what}: not all integers")
    u = u.astype(np.int64)
    bad = u[(u < 0) | (u >= config.codebook_size)]
    if bad.size:
        raise ValueError(f"{what}: unit ids {bad[:5].tolist()} outside the codec's codebook "
                         f"[0, {config.codebook_size})")
    return u


def _key(seed: int, utterance: int):
    return jax.random.fold_in(jax.random.key(int(seed)), int(utterance))


def decode_units(config: UnitCodecConfig, params,
                 units: Union[np.ndarray, Sequence[Sequence[int]]], seed: int = 0,
                 batch_size: int = 8, first_index: int = 0) -> List[np.ndarray]:
    """Unit sequences -> float32 waveforms at `config.sampling_rate` (320 samples a unit).

    Every sequence is checked first (`check_units`: the ValueError names its index). Rows
    are batched by length bucket; utterance i draws its start phase from
    fold_in(key(seed), first_index + i), so the audio does not depend on batching."""
    seqs = [units] if isinstance(units, np.ndarray) and units.ndim == 1 else list(units)
    seqs = [check_units(config, u, f"utterance {first_index + i}") for i, u in enumerate(seqs)]
    spu = samples_per_unit(config)
    out: List[Optional[np.ndarray]] = [None] * len(seqs)
    for t, group in _batches([len(u) for u in seqs], config.length_bucket, batch_size):
        w = _width(len(group))
        codes = np.zeros((w, t), np.int32)
        keys = [_key(seed, first_index + group[0])] * w
        for r, i in enumerate(group):
            codes[r, :len(seqs[i])] = seqs[i]
            # past the end: the unit that speaks quietest, so padding adds no sound
            codes[r, len(seqs[i]):] = int(np.argmin(np.asarray(
                params["spectra"]).mean(axis=(1, 2))))
            keys[r] = _key(seed, first_index + i)
        wav = np.asarray(_decode_jit(config, params, jnp.asarray(codes), jnp.stack(keys)))
        for r, i in enumerate(group):
            out[i] = wav[r, :len(seqs[i]) * spu].astype(np.float32)
    return out


def stream_decode(config: UnitCodecConfig, params, chunks: Iterable[Sequence[int]],
                  seed: int = 0) -> Iterator[np.ndarray]:
    """Decodes units as they arrive: each chunk (a list of units; empty chunks are skipped)
    is decoded on its own as soon as it comes and its audio yielded, so playback can start
    before the reply's last unit exists. Chunk k draws its phase from fold_in(key(seed), k)."""
    k = 0
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        yield decode_units(config, params, [chunk], seed=seed, first_index=k)[0]
        k += 1


# ---------------------------------------------------------------------------------------------
# Fitting


def kmeans(x: jnp.ndarray, k: int, *, iters: int = 30, seed: int = 0):
    """Lloyd's k-means on x [N, D] (float32) in JAX: (centroids [k, D], assignment [N]).
    Starts from k distinct random rows; an empty cluster keeps its centroid."""
    x = jnp.asarray(x, jnp.float32)
    if x.shape[0] < k:
        raise ValueError(f"k-means with {k} codes needs at least {k} frames, got {x.shape[0]}")
    init = x[jax.random.choice(jax.random.key(seed), x.shape[0], (k,), replace=False)]
    x2 = jnp.sum(x * x, -1)

    @jax.jit
    def assign(c):
        return jnp.argmin(x2[:, None] - 2.0 * x @ c.T + jnp.sum(c * c, -1)[None], axis=-1)

    @jax.jit
    def step(c, _):
        a = assign(c)
        sums = jax.ops.segment_sum(x, a, num_segments=k)
        cnt = jax.ops.segment_sum(jnp.ones_like(x2), a, num_segments=k)
        return jnp.where(cnt[:, None] > 0, sums / jnp.maximum(cnt, 1.0)[:, None], c), None

    c = init
    for _ in range(iters):
        c, _ = step(c, None)
    return c, assign(c)


def fit(config: UnitCodecConfig, clips: Sequence[np.ndarray], *, iters: int = 30,
        seed: int = 0, batch_size: int = 16):
    """Fits the codec on 16 kHz clips: k-means codebook over their analysis features and,
    for each codeword, the mean log-magnitude frames it stands for. Returns params."""
    c = config
    spu = samples_per_unit(c)
    dummy = init_params(c, jax.random.key(0))
    feats, mags = [], []
    mag_cfg = dataclasses.replace(c, feature="logmag")
    for t, group in _batches([len(x) // spu for x in clips], c.length_bucket, batch_size):
        x = np.zeros((_width(len(group)), t * spu), np.float32)
        for r, i in enumerate(group):
            n = (len(clips[i]) // spu) * spu
            x[r, :n] = clips[i][:n]
        f = np.asarray(_features_jit(c, dummy, jnp.asarray(x)))
        m = f if c.feature == "logmag" else np.asarray(_features_jit(
            mag_cfg, init_params(mag_cfg, jax.random.key(0)), jnp.asarray(x)))
        for r, i in enumerate(group):
            n = len(clips[i]) // spu
            feats.append(f[r, :n])
            mags.append(m[r, :n])
    feats, mags = np.concatenate(feats), np.concatenate(mags)
    centroids, assign = kmeans(feats, c.codebook_size, iters=iters, seed=seed)
    assign = np.asarray(assign)
    cnt = np.bincount(assign, minlength=c.codebook_size).astype(np.float32)
    spectra = np.zeros((c.codebook_size, mags.shape[1]), np.float32)
    np.add.at(spectra, assign, mags)
    spectra /= np.maximum(cnt, 1.0)[:, None]
    spectra[cnt == 0] = np.log(c.floor)  # never chosen: silence
    bins = c.n_fft // 2 + 1
    return {"codebook": jnp.asarray(centroids),
            "spectra": jnp.asarray(spectra.reshape(c.codebook_size, c.frames_per_unit, bins))}
