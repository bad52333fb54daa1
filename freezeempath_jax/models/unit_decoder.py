"""The release's units-to-waveform decoder: speech unit ids -> 22,050 Hz audio, batched.

Per chunk of at most 1500 units (the release's flow):

    ids [B, T] -> codebook lookup [B, T, 1024] -> length regulator to int(T * 1.72) frames
    -> prompt_condition in front -> CFM (25 Euler steps, guidance 0.7, ref_mel as prompt,
    the fixed style) -> drop the prompt frames -> BigVGAN -> clip to [-1, 1]

and an utterance's chunks are joined with 200 ms of silence. Under jit every shape is static:
unit lengths are padded up to a multiple of `config.length_bucket` (and the batch to a power
of two), each row carries its true length, and every part masks by it, so a padded row
decodes as it would alone; outputs are trimmed to int(T * 1.72) * 256 samples.

Parameters: {"codec", "length_regulator", "dit", "bigvgan", "voice": {"style" [S],
"prompt_condition" [P, D], "ref_mel" [P, n_mels]}} (the voice is fixed by the release).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, List, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from freezeempath_jax.models.bigvgan import BigVGAN
from freezeempath_jax.models.configs import UnitDecoderConfig
from freezeempath_jax.models.dit import DiT
from freezeempath_jax.models.flow_matching import sample
from freezeempath_jax.models.length_regulator import LengthRegulator
from freezeempath_jax.models.semantic_codec import SemanticCodebook

# What the vocoder is fed past a row's end. BigVGAN's first conv zero-pads, so zeros make its
# output exact up to the row's end; deeper layers still reach into the padding, which moves
# only the last few frames (measured: <= 4e-3 except the final 256 samples, < 1e-4 from 10
# frames before the end). Log-mel silence (log 1e-5) instead was 20x further off.
SILENT_MEL = 0.0


def mel_frames(n_units, frames_per_unit: float = 1.72):
    """int(n * 1.72) as the reference computes it (float32 product, truncated)."""
    prod = np.asarray(n_units, np.float32) * np.float32(frames_per_unit)
    return prod.astype(np.int64)


def init_params(config: UnitDecoderConfig, key, prompt_frames: Optional[int] = None):
    """Random parameters of every part plus a random voice (for tests and benchmarks)."""
    p = prompt_frames or config.prompt_frames or 8
    k = jax.random.split(key, 7)
    d = config.dit
    ids = jnp.zeros((1, 4), jnp.int32)
    params = {
        "codec": SemanticCodebook(config.codec).init(k[0], ids)["params"],
        "length_regulator": LengthRegulator(config.length_regulator).init(
            k[1], jnp.zeros((1, 4, config.length_regulator.in_channels)), jnp.array([4]),
            jnp.array([6]), 6)["params"],
        "dit": DiT(d).init(k[2], jnp.zeros((1, 6, d.in_channels)),
                           jnp.zeros((1, 6, d.in_channels)), jnp.array([6]), jnp.zeros((1,)),
                           jnp.zeros((1, d.style_dim)), jnp.zeros((1, 6, d.content_dim)))["params"],
        "bigvgan": BigVGAN(config.bigvgan).init(
            k[3], jnp.zeros((1, config.bigvgan.num_mels, 4)))["params"],
        "voice": {"style": jax.random.normal(k[4], (d.style_dim,)),
                  "prompt_condition": jax.random.normal(k[5], (p, d.content_dim)),
                  "ref_mel": jax.random.normal(k[6], (p, d.in_channels)) - 5.0},
    }
    return params


def frame_noise(key, n_frames: int, channels: int):
    """[n_frames, channels] standard normal noise, frame t drawn from fold_in(key, t): the
    noise a frame gets does not depend on how far the row was padded."""
    return jax.vmap(lambda t: jax.random.normal(jax.random.fold_in(key, t), (channels,)))(
        jnp.arange(n_frames))


def decode_batch(config: UnitDecoderConfig, params, codes, lens, noise):
    """The whole chain on one padded batch (traceable; `decode_batch_jit` jits it).

    codes [B, T] int, lens [B] valid units per row (>= 1), noise [B, P + M, n_mels] with
    M = int(T * 1.72) and P the voice's prompt frames. Returns (waveform [B, M * hop] in
    [-1, 1], valid samples per row [B])."""
    c = config
    voice = params["voice"]
    b, t = codes.shape
    n_mel = int(mel_frames(t, c.frames_per_unit))
    ylens = (lens.astype(jnp.float32) * jnp.float32(c.frames_per_unit)).astype(jnp.int32)
    feats = SemanticCodebook(c.codec).apply({"params": params["codec"]}, codes)
    cond = LengthRegulator(c.length_regulator).apply(
        {"params": params["length_regulator"]}, feats, lens, ylens, n_mel)
    p = voice["ref_mel"].shape[0]
    prompt_cond = jnp.broadcast_to(voice["prompt_condition"][None].astype(cond.dtype),
                                   (b,) + voice["prompt_condition"].shape)
    mu = jnp.concatenate([prompt_cond, cond], axis=1)
    prompt_mel = jnp.broadcast_to(voice["ref_mel"][None], (b,) + voice["ref_mel"].shape)
    style = jnp.broadcast_to(voice["style"][None], (b,) + voice["style"].shape)
    mel = sample(DiT(c.dit), params["dit"], noise.astype(jnp.float32), prompt_mel, mu,
                 p + ylens, style, steps=c.diffusion_steps, cfg_rate=c.cfg_rate)[:, p:]
    mel = jnp.where((jnp.arange(n_mel)[None, :] < ylens[:, None])[..., None], mel, SILENT_MEL)
    wav = BigVGAN(c.bigvgan).apply({"params": params["bigvgan"]}, jnp.swapaxes(mel, 1, 2))
    return jnp.clip(wav, -1.0, 1.0), ylens * c.bigvgan.hop_length


decode_batch_jit = jax.jit(decode_batch, static_argnums=(0,))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _decode_keys(config: UnitDecoderConfig, params, codes, n_noise: int, lens, keys):
    noise = jax.vmap(lambda k: frame_noise(k, n_noise, config.dit.in_channels))(keys)
    return decode_batch(config, params, codes, lens, noise)


def _bucket(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _as_list(units) -> List[np.ndarray]:
    if isinstance(units, np.ndarray) or hasattr(units, "shape"):
        arr = np.asarray(units)
        return [arr] if arr.ndim == 1 else [row for row in arr]
    return [np.asarray(u) for u in units]


def _chunks(u: np.ndarray, size: int) -> List[np.ndarray]:
    return [u[i:i + size] for i in range(0, len(u), size)]


def _chunk_key(seed: int, utterance: int, chunk: int):
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), utterance), chunk)


def _run(config, params, jobs, batch_size: int):
    """Decodes (key, units) jobs grouped by length bucket; returns waveforms in job order."""
    out: List[Optional[np.ndarray]] = [None] * len(jobs)
    # fields that only steer chunking and bucketing would otherwise force a recompile
    graph = dataclasses.replace(config, max_chunk_units=0, silence_seconds=0.0, length_bucket=0)
    p = int(params["voice"]["ref_mel"].shape[0])
    by_bucket = {}
    for i, (_, u) in enumerate(jobs):
        by_bucket.setdefault(_bucket(len(u), config.length_bucket), []).append(i)
    for t, idx in sorted(by_bucket.items()):
        for s in range(0, len(idx), batch_size):
            group = idx[s:s + batch_size]
            b = 1 << (len(group) - 1).bit_length()  # a power of two: few compiled shapes
            codes = np.zeros((b, t), np.int32)
            lens = np.full((b,), t, np.int32)  # filler rows: full length, results dropped
            keys = [jobs[group[0]][0]] * b
            for r, j in enumerate(group):
                key, u = jobs[j]
                codes[r, :len(u)], lens[r], keys[r] = u, len(u), key
            wav, n = _decode_keys(graph, params, jnp.asarray(codes),
                                  p + int(mel_frames(t, config.frames_per_unit)),
                                  jnp.asarray(lens), jnp.stack(keys))
            wav, n = np.asarray(wav), np.asarray(n)
            for r, j in enumerate(group):
                out[j] = wav[r, :n[r]].astype(np.float32)
    return out


def decode_units(config: UnitDecoderConfig, params,
                 units: Union[np.ndarray, Sequence[np.ndarray]], seed: int = 0,
                 batch_size: int = 8) -> List[np.ndarray]:
    """Unit ids -> float32 waveforms at 22,050 Hz, one per utterance.

    units: one 1-D array, a 2-D array (one utterance per row) or a list of 1-D arrays of
    any lengths. Utterances longer than `config.max_chunk_units` are decoded in chunks joined
    by `config.silence_seconds` of silence, as the release does. All chunks of all
    utterances are batched together by length bucket. `seed` fixes the CFM noise (each
    utterance and chunk draws its own, independent of batching and padding).
    """
    utts = _as_list(units)
    jobs, where = [], []
    for ui, u in enumerate(utts):
        u = np.asarray(u, np.int64).reshape(-1)
        parts = _chunks(u, config.max_chunk_units) if len(u) else []
        where.append(len(parts))
        jobs += [(_chunk_key(seed, ui, ci), part) for ci, part in enumerate(parts)]
    wavs = _run(config, params, jobs, batch_size)
    gap = np.zeros(int(round(config.silence_seconds * config.bigvgan.sampling_rate)), np.float32)
    out, k = [], 0
    for n in where:
        pieces = []
        for ci in range(n):
            if ci:
                pieces.append(gap)
            pieces.append(wavs[k + ci])
        k += n
        out.append(np.concatenate(pieces) if pieces else np.zeros(0, np.float32))
    return out


def stream_units(config: UnitDecoderConfig, params, units: np.ndarray, seed: int = 0,
                 chunk_units: Optional[int] = None,
                 silence_seconds: float = 0.0) -> Iterator[np.ndarray]:
    """Decodes one utterance a chunk at a time, yielding each chunk's audio as soon as it is
    ready (float32, 22,050 Hz). Chunks are decoded independently like the release's
    1500-unit chunks, so small chunks trade some continuity at the joins for latency;
    `silence_seconds` of silence is yielded between chunks (0 by default when streaming).
    With chunk_units = max_chunk_units and the release's 0.2 s this yields exactly the
    pieces `decode_units` joins."""
    size = min(chunk_units or config.max_chunk_units, config.max_chunk_units)
    u = np.asarray(units, np.int64).reshape(-1)
    gap = np.zeros(int(round(silence_seconds * config.bigvgan.sampling_rate)), np.float32)
    for ci, part in enumerate(_chunks(u, size)):
        if ci and len(gap):
            yield gap
        yield _run(config, params, [(_chunk_key(seed, 0, ci), part)], 1)[0]
