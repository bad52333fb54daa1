"""Audio front end: decode files to 16 kHz mono and compute Whisper log-mel features.

Everything here is NumPy on the host, because it runs inside data pipelines and the chat
command before anything reaches an accelerator.

- `load_audio` decodes any format soundfile (libsndfile) reads, mixes channels to mono by
  their mean and resamples with `librosa.resample(res_type="soxr_hq")` (the SoX resampler at
  high quality; the output length is `ceil(n * target / source)`).
- `log_mel_spectrogram` follows the Whisper convention (DESIGN.md section 2) and equals
  `transformers.WhisperFeatureExtractor` (its NumPy path) for the same settings: pad or trim
  to 30 s, a centred STFT (n_fft 400, hop 160, periodic Hann, reflect padding), power
  spectrum, Slaney mel filterbank up to 8 kHz, `log10(max(mel, 1e-10))`, clamp below
  `max - 8`, `(x + 4) / 4`, and the last frame dropped: 3000 frames for 30 s.

Bad input raises `AudioError` (a `ValueError`) that names the file or the array's shape and
what is wrong with it. That includes input that would decode but not make sense: a header's
sampling rate outside `MIN_SAMPLE_RATE`..`MAX_SAMPLE_RATE` or a duration above `max_seconds`
(checked before decoding, so a corrupt header cannot make us allocate gigabytes), and samples
beyond `MAX_ABS_SAMPLE` (a flipped exponent bit in a float WAV), which would otherwise
overflow the float32 power spectrum into an all-NaN mel.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np
import soundfile as sf

SAMPLING_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
MEL_FMAX = 8000.0
CHUNK_SECONDS = 30.0

# Float audio is at most 1.0 at full scale; real files stay within a few times that (careless
# gain). 1000 (+60 dB) leaves generous headroom yet keeps every later step far from float32
# overflow (a 400-sample frame's power is at most (200 * 1000)^2 per bin), while a flipped
# exponent bit (a sample of -8.7e37) lands far above it. Float files written at integer scale
# (+-32768) are rejected too; the message says why, so they can be rescaled.
MAX_ABS_SAMPLE = 1000.0
# Sampling rates real recordings use lie in 8-384 kHz; 1 kHz leaves room for odd sensor data.
# A header outside this range is corrupt, and a tiny rate would make resampling to 16 kHz
# blow a few kilobytes up into gigabytes.
MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 384000
# Default bound on a decoded file's duration: an hour is far beyond any utterance the models
# take (30 s windows) and still only 230 MB of float32 at 16 kHz.
MAX_SECONDS = 3600.0

__all__ = [
    "AudioError",
    "CHUNK_SECONDS",
    "HOP_LENGTH",
    "MAX_ABS_SAMPLE",
    "MAX_SAMPLE_RATE",
    "MAX_SECONDS",
    "MIN_SAMPLE_RATE",
    "N_FFT",
    "SAMPLING_RATE",
    "duration_seconds",
    "load_audio",
    "log_mel_spectrogram",
    "log_mel_spectrogram_batch",
    "mel_filters",
    "pad_or_trim",
]


class AudioError(ValueError):
    """Audio that cannot be used: missing, unreadable, empty, absurd, or holding NaN/inf."""


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------


def _check_readable_path(path: str | os.PathLike) -> str:
    name = os.fspath(path)
    if not os.path.exists(name):
        raise AudioError(f"audio file {name!r} does not exist")
    if not os.path.isfile(name):
        raise AudioError(f"audio file {name!r} is not a regular file")
    if os.path.getsize(name) == 0:
        raise AudioError(f"audio file {name!r} is empty (0 bytes)")
    return name


def duration_seconds(path: str | os.PathLike) -> float:
    """Duration of an audio file in seconds, read from its header without decoding samples.

    Pipelines use it to skip files that are too long before paying for decoding.
    """
    name = _check_readable_path(path)
    info = _checked_info(name)
    return info.frames / info.samplerate


def _checked_info(name: str, failure: str = "could not be read"):
    """The header of `name` (soundfile's `_SoundFileInfo`), with a plausible sampling rate."""
    try:
        info = sf.info(name)
    except (sf.SoundFileError, RuntimeError, OSError, TypeError) as e:
        raise AudioError(f"audio file {name!r} {failure}: {e}") from e
    if not MIN_SAMPLE_RATE <= info.samplerate <= MAX_SAMPLE_RATE:
        raise AudioError(
            f"audio file {name!r} reports sampling rate {info.samplerate} Hz, outside "
            f"{MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz; its header is probably corrupt"
        )
    return info


def _check_magnitude(samples: np.ndarray, what: str) -> None:
    # Called after the finiteness check, so the peak is a finite number.
    peak = float(np.abs(samples).max())
    if peak > MAX_ABS_SAMPLE:
        raise AudioError(
            f"{what} has samples up to {peak:.3g} in magnitude, beyond {MAX_ABS_SAMPLE:g} "
            f"(full scale is 1.0): corrupt data, or float samples at integer scale"
        )


def load_audio(
    path: str | os.PathLike,
    sampling_rate: int = SAMPLING_RATE,
    *,
    max_seconds: float | None = MAX_SECONDS,
) -> np.ndarray:
    """Decode an audio file to float32 mono samples at `sampling_rate`.

    Args:
      path: any file libsndfile decodes (WAV of any sample type including 32-bit float,
        FLAC, OGG, MP3 with libsndfile >= 1.1, ...), at any sampling rate and channel count.
      sampling_rate: target rate in Hz. Channels are averaged to mono, then the signal is
        resampled with soxr at high quality (`librosa.resample(res_type="soxr_hq")`).
      max_seconds: longest duration accepted, read from the header before decoding (None:
        no bound).

    Returns:
      float32 array `[samples]`, `samples == ceil(n_source * sampling_rate / source_rate)`,
      every sample finite.

    Raises:
      AudioError: the file is missing or unreadable, holds no samples, holds NaN/inf or
        samples beyond `MAX_ABS_SAMPLE`, its header's sampling rate is outside
        `MIN_SAMPLE_RATE`..`MAX_SAMPLE_RATE`, or it lasts more than `max_seconds`.
    """
    if int(sampling_rate) != sampling_rate or sampling_rate <= 0:
        raise AudioError(f"sampling_rate must be a positive integer, got {sampling_rate!r}")
    name = _check_readable_path(path)
    info = _checked_info(name, "could not be decoded")
    if max_seconds is not None and info.frames > max_seconds * info.samplerate:
        raise AudioError(
            f"audio file {name!r} lasts {info.frames / info.samplerate:.1f} s ({info.frames} "
            f"frames at {info.samplerate} Hz), more than max_seconds={max_seconds:g}"
        )
    try:
        # always_2d gives [frames, channels] for mono and multichannel alike.
        data, source_rate = sf.read(name, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError, TypeError) as e:
        raise AudioError(f"audio file {name!r} could not be decoded: {e}") from e
    if data.size == 0:
        raise AudioError(f"audio file {name!r} contains no samples")
    if not np.isfinite(data).all():
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise AudioError(f"audio file {name!r} contains {bad} NaN or infinite samples")
    # Before mixing and resampling: both overflow float32 on huge finite values.
    _check_magnitude(data, f"audio file {name!r}")

    audio = data.mean(axis=1, dtype=np.float32)
    if source_rate != sampling_rate:
        # Imported lazily: librosa's import is slow and unused when rates already match.
        import librosa

        audio = librosa.resample(
            audio, orig_sr=source_rate, target_sr=int(sampling_rate), res_type="soxr_hq"
        )
        # librosa sizes its output with a float ratio, which can add one zero sample
        # (22050 samples at 22.05 kHz -> 24001 at 24 kHz); the exact length is integer math.
        audio = pad_or_trim(audio, -(-data.shape[0] * int(sampling_rate) // source_rate))
    if not np.isfinite(audio).all():
        # Unreachable for bounded input; kept so no caller ever sees a non-finite sample.
        raise AudioError(f"audio file {name!r} resampled to non-finite samples")
    return np.ascontiguousarray(audio, dtype=np.float32)


# ---------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------


def _hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
    # Slaney's Auditory Toolbox scale: linear (3 mel per 200 Hz) below 1 kHz, log above.
    hz = np.asarray(hz, dtype=np.float64)
    f_break, mel_break = 1000.0, 15.0
    log_step = np.log(6.4) / 27.0
    linear = 3.0 * hz / 200.0
    log = mel_break + np.log(np.maximum(hz, f_break) / f_break) / log_step
    return np.where(hz >= f_break, log, linear)


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    f_break, mel_break = 1000.0, 15.0
    log_step = np.log(6.4) / 27.0
    linear = 200.0 * mel / 3.0
    log = f_break * np.exp(log_step * (np.maximum(mel, mel_break) - mel_break))
    return np.where(mel >= mel_break, log, linear)


@functools.lru_cache(maxsize=16)
def _mel_filters_cached(n_mels: int, sampling_rate: int, n_fft: int, fmax: float) -> np.ndarray:
    fft_freqs = np.linspace(0.0, sampling_rate / 2, n_fft // 2 + 1)
    mel_points = np.linspace(_hz_to_mel_slaney(0.0), _hz_to_mel_slaney(fmax), n_mels + 2)
    edges = _mel_to_hz_slaney(mel_points)  # [n_mels + 2] Hz: lower, centre, upper per band

    # Triangles: rising slope from edges[m] to edges[m+1], falling to edges[m+2].
    widths = np.diff(edges)  # [n_mels + 1]
    offsets = edges[:, None] - fft_freqs[None, :]  # [n_mels + 2, n_freq]
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    filters = np.maximum(0.0, np.minimum(rising, falling))  # [n_mels, n_freq]

    # Slaney normalisation: each triangle has unit area in Hz, so bands carry equal energy.
    filters *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    filters.setflags(write=False)
    return filters


def mel_filters(n_mels: int = 128, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Slaney-scale, Slaney-normalised mel filterbank `[n_mels, n_fft // 2 + 1]` (float64).

    Whisper's filters: 0 Hz to 8 kHz over the 201 bins of a 400-point FFT; the same as
    `librosa.filters.mel(sr, n_fft=400, n_mels=n_mels, fmax=8000, htk=False, norm="slaney")`
    and transformers' `mel_filter_bank(..., norm="slaney", mel_scale="slaney")` transposed.
    The returned array is cached and read-only.
    """
    if n_mels <= 0:
        raise ValueError(f"n_mels must be positive, got {n_mels}")
    return _mel_filters_cached(int(n_mels), int(sampling_rate), N_FFT, MEL_FMAX)


@functools.lru_cache(maxsize=1)
def _hann_window() -> np.ndarray:
    # Periodic Hann (as torch.hann_window and WhisperFeatureExtractor): the DFT-even window.
    n = np.arange(N_FFT)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)
    window.setflags(write=False)
    return window


def pad_or_trim(audio: np.ndarray, length: int) -> np.ndarray:
    """Zero-pad at the end or cut `audio` along its last axis to exactly `length` samples."""
    audio = np.asarray(audio)
    if length < 0:
        raise ValueError(f"length must be non-negative, got {length}")
    n = audio.shape[-1]
    if n > length:
        return audio[..., :length]
    if n < length:
        widths = [(0, 0)] * (audio.ndim - 1) + [(0, length - n)]
        return np.pad(audio, widths)
    return audio


def _target_length(pad_or_trim_seconds: float | None, sampling_rate: int) -> int | None:
    if pad_or_trim_seconds is None:
        return None
    if not pad_or_trim_seconds > 0:
        raise AudioError(
            f"pad_or_trim_seconds must be positive or None, got {pad_or_trim_seconds}"
        )
    return int(round(pad_or_trim_seconds * sampling_rate))


def _as_checked_mono(audio, what: str) -> np.ndarray:
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise AudioError(f"{what}: expected mono samples [samples], got shape {audio.shape}")
    if audio.size == 0:
        raise AudioError(f"{what}: audio is empty")
    if not np.isfinite(audio).all():
        bad = int(audio.size - np.count_nonzero(np.isfinite(audio)))
        raise AudioError(
            f"{what}: audio contains NaN or infinite samples ({bad} of shape {audio.shape})"
        )
    _check_magnitude(audio, f"{what}: audio of shape {audio.shape}")
    return audio.astype(np.float32, copy=False)


def _log_mel(clip: np.ndarray, length: int, n_mels: int, sampling_rate: int) -> np.ndarray:
    """Log-mel of one checked mono clip zero-padded or cut to `length` samples.

    Returns float32 `[n_mels, length // hop]`, the same numbers as running the full
    centred STFT on the padded signal. Frames that see only the zero padding have zero
    power, so they are not transformed: their value is the `1e-10` floor. That makes a
    typical 2-8 s clip padded to 30 s several times cheaper.
    """
    half = N_FFT // 2
    n_frames = length // HOP_LENGTH  # the STFT gives one more; Whisper drops the last
    if n_frames == 0:
        raise AudioError(
            f"log-mel of audio {length} samples long (after padding or trimming) has no "
            f"frame; at least {HOP_LENGTH} samples are needed"
        )
    n_signal = min(length, clip.shape[0])
    # Frame t covers samples [t * hop - half, t * hop + half), reflected past either end.
    # When the clip ends more than `half` before `length`, the reflected tail is zeros too
    # and frames from ceil((n_signal + half) / hop) on see nothing but zeros.
    n_active = n_frames
    if n_signal + half < length:
        n_active = min(n_frames, -(-(n_signal + half) // HOP_LENGTH))
    # The computed frames reach no further than this, so the rest need not exist.
    used = min(length, n_active * HOP_LENGTH + half)
    padded = np.pad(pad_or_trim(clip, used), half, mode="reflect")
    # [frames, n_fft] strided view of the overlapping frames.
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)
    frames = frames[: n_active * HOP_LENGTH : HOP_LENGTH]
    # float64 FFT as in the reference (numpy's float32 FFT measured no faster here).
    spectrum = np.fft.rfft(frames * _hann_window(), axis=-1)  # [frames, n_fft // 2 + 1]
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    filters = mel_filters(n_mels, sampling_rate).astype(np.float32)
    mel = (power @ filters.T).T  # [n_mels, active frames]
    log_active = np.log10(np.maximum(mel, np.float32(1e-10)))

    # Skipped frames hold log10(1e-10) = -10, never above the computed peak, so the peak
    # (taken per clip, as in Whisper) comes from the computed frames alone.
    silent = np.float32(-10.0)
    floor = log_active.max() - np.float32(8.0)
    log_spec = np.empty((n_mels, n_frames), np.float32)
    log_spec[:, :n_active] = np.maximum(log_active, floor)
    log_spec[:, n_active:] = np.maximum(silent, floor)
    log_spec += np.float32(4.0)
    log_spec /= np.float32(4.0)
    return log_spec


def log_mel_spectrogram(
    audio: np.ndarray,
    n_mels: int = 128,
    pad_or_trim_seconds: float | None = CHUNK_SECONDS,
    sampling_rate: int = SAMPLING_RATE,
) -> np.ndarray:
    """Whisper log-mel features of one mono clip: float32 `[n_mels, frames]`.

    Args:
      audio: float samples `[samples]` at `sampling_rate`.
      n_mels: 80 for Whisper up to large-v2, 128 for large-v3.
      pad_or_trim_seconds: zero-pad or cut to this many seconds first (30 s -> 480,000
        samples -> 3000 frames). None keeps the clip as it is: `frames = samples // 160`.
      sampling_rate: the rate of `audio`; it sets the padded length and the filterbank's
        frequency axis (n_fft and hop stay 400 and 160, as in WhisperFeatureExtractor).

    Raises:
      AudioError: empty input, NaN/inf samples or samples beyond `MAX_ABS_SAMPLE`, not 1-D,
        or fewer than 160 samples left.
    """
    audio = _as_checked_mono(audio, "log_mel_spectrogram")
    length = _target_length(pad_or_trim_seconds, sampling_rate)
    if length is None:
        length = audio.shape[0]
    return _log_mel(audio, length, n_mels, sampling_rate)


def log_mel_spectrogram_batch(
    audios: Sequence[np.ndarray],
    n_mels: int = 128,
    pad_or_trim_seconds: float | None = CHUNK_SECONDS,
    sampling_rate: int = SAMPLING_RATE,
) -> np.ndarray:
    """Log-mel features of several clips at once: float32 `[B, n_mels, frames]`.

    Each clip is padded or trimmed to `pad_or_trim_seconds`; with None, clips are zero-padded
    at the end to the longest one (WhisperFeatureExtractor's `padding="longest"`). Row i
    equals `log_mel_spectrogram(audios[i], ...)` on the same padded signal: the `max - 8`
    floor is taken per clip. Clips are computed one by one (each frame matrix is already
    vectorised), so short clips in a batch cost only their own active frames.
    """
    if len(audios) == 0:
        raise AudioError("log_mel_spectrogram_batch: got an empty list of clips")
    clips = [
        _as_checked_mono(a, f"log_mel_spectrogram_batch item {i}") for i, a in enumerate(audios)
    ]
    length = _target_length(pad_or_trim_seconds, sampling_rate)
    if length is None:
        length = max(c.shape[0] for c in clips)
    return np.stack([_log_mel(c, length, n_mels, sampling_rate) for c in clips])
