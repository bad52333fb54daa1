"""Audio front end: parity with transformers' WhisperFeatureExtractor, file decoding, errors.

The reference is `WhisperFeatureExtractor.__call__` forced onto its NumPy path (transformers
picks the torch path whenever torch is installed), so its own padding and trimming are
checked as well as the spectrogram. Real speech comes from `../shared/audio` (22.05 kHz
32-bit float WAVs); those tests skip when the folder is absent.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from freezeempath_jax import audio

SHARED_AUDIO = Path(__file__).resolve().parents[1].parent / "shared" / "audio"
TOL = 1e-4  # absolute, on the (x + 4) / 4 scaled log-mel


def _speech_files() -> list[Path]:
    files = sorted(SHARED_AUDIO.glob("*.wav")) if SHARED_AUDIO.is_dir() else []
    if not files:
        pytest.skip(f"no shared speech samples in {SHARED_AUDIO}")
    return files


@pytest.fixture(scope="module")
def speech() -> dict[str, np.ndarray]:
    """The shared speech samples decoded by `load_audio` (16 kHz mono), by file name."""
    return {path.name: audio.load_audio(path) for path in _speech_files()}


@pytest.fixture
def reference(monkeypatch):
    """`reference(audio, n_mels, **call_kwargs)` -> WhisperFeatureExtractor features (NumPy)."""
    feature_extraction_whisper = pytest.importorskip(
        "transformers.models.whisper.feature_extraction_whisper"
    )
    monkeypatch.setattr(feature_extraction_whisper, "is_torch_available", lambda: False)
    extractors = {}

    def run(x, n_mels, **kwargs):
        if n_mels not in extractors:
            extractors[n_mels] = feature_extraction_whisper.WhisperFeatureExtractor(
                feature_size=n_mels
            )
        out = extractors[n_mels](x, sampling_rate=16000, return_tensors="np", **kwargs)
        return out["input_features"]

    return run


def _noise(n: int, seed: int, scale: float = 0.1) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Filterbank
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_transformers_and_librosa(n_mels):
    from transformers.audio_utils import mel_filter_bank

    ours = audio.mel_filters(n_mels)
    assert ours.shape == (n_mels, 201)
    theirs = mel_filter_bank(
        num_frequency_bins=201,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=16000,
        norm="slaney",
        mel_scale="slaney",
    )
    np.testing.assert_allclose(ours, theirs.T, rtol=1e-12, atol=1e-15)
    librosa = pytest.importorskip("librosa")
    lib = librosa.filters.mel(
        sr=16000, n_fft=400, n_mels=n_mels, fmax=8000, htk=False, norm="slaney"
    )
    # librosa builds its filters in float32.
    np.testing.assert_allclose(ours, lib, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------
# Log-mel parity
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_reference_on_real_speech(n_mels, speech, reference):
    worst = 0.0
    for name, x in speech.items():
        ours = audio.log_mel_spectrogram(x, n_mels=n_mels)
        assert ours.dtype == np.float32 and ours.shape == (n_mels, 3000)
        theirs = reference(x, n_mels)[0]
        err = float(np.abs(ours - theirs).max())
        assert err <= TOL, f"{name}: max abs error {err}"
        worst = max(worst, err)
    print(f"real speech, {n_mels} mels, {len(speech)} files: max abs error {worst:.3g}")


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize(
    "seconds", [30.0, 4.5, 41.0], ids=["exact-30s", "short-padded", "long-trimmed"]
)
def test_log_mel_matches_reference_on_noise(n_mels, seconds, reference):
    x = _noise(int(seconds * 16000), seed=int(seconds * 10) + n_mels)
    ours = audio.log_mel_spectrogram(x, n_mels=n_mels)
    theirs = reference(x, n_mels)[0]
    assert ours.shape == theirs.shape == (n_mels, 3000)
    err = float(np.abs(ours - theirs).max())
    print(f"noise {seconds} s, {n_mels} mels: max abs error {err:.3g}")
    assert err <= TOL


def test_trimmed_clip_equals_its_first_30_seconds():
    x = _noise(35 * 16000, seed=3)
    np.testing.assert_array_equal(
        audio.log_mel_spectrogram(x), audio.log_mel_spectrogram(x[:480000])
    )


# Frames that see only the zero padding are skipped inside log_mel_spectrogram; these lengths
# sit on either side of where that starts (a clip ending `half` = 200 samples before the
# padded end, plus hop-sized steps). The logic does not depend on the target, so the short
# one gets every offset and the 30 s one the critical few.
_OFFSETS = [-1, 0, 1, 39, 40, 41, 159, 160, 199, 200, 201, 240, 361]


@pytest.mark.parametrize(
    "target, offset",
    [(4000, o) for o in _OFFSETS] + [(480000, o) for o in (-1, 0, 199, 200, 201)],
)
def test_log_mel_matches_reference_near_the_padding_boundary(target, offset, reference):
    n = target - offset
    x = _noise(n, seed=offset + 1000, scale=0.5)
    ours = audio.log_mel_spectrogram(x, n_mels=80, pad_or_trim_seconds=target / 16000)
    theirs = reference(x, 80, padding="max_length", max_length=target, truncation=True)[0]
    assert ours.shape == theirs.shape == (80, target // 160)
    assert float(np.abs(ours - theirs).max()) <= TOL


@pytest.mark.parametrize("n", [160, 200, 201, 1000, 12345])
def test_log_mel_without_padding(n, reference):
    x = _noise(n, seed=n)
    ours = audio.log_mel_spectrogram(x, n_mels=128, pad_or_trim_seconds=None)
    assert ours.shape == (128, n // 160)
    theirs = reference(x, 128, padding="do_not_pad")[0]
    assert float(np.abs(ours - theirs).max()) <= TOL


@pytest.mark.parametrize("scale", [0.0, 1e-6, 1.0], ids=["silence", "quiet", "loud"])
def test_padding_frames_take_the_clamped_silence_value(scale, reference):
    # Frames that see only padding are not computed but filled in: they must hold
    # log10(1e-10) = -10 clamped at the clip's own peak - 8, whichever clamp binds.
    x = _noise(16000, seed=7, scale=scale)
    ours = audio.log_mel_spectrogram(x, n_mels=80)
    theirs = reference(x, 80)[0]
    assert float(np.abs(ours - theirs).max()) <= TOL
    peak = 4.0 * float(ours.max()) - 4.0
    np.testing.assert_allclose(ours[:, 200:], (max(-10.0, peak - 8.0) + 4.0) / 4.0, atol=1e-6)


def test_batch_equals_single_clips_and_reference(reference):
    clips = [_noise(n, seed=n) for n in (16000, 50000, 3200)]
    batch = audio.log_mel_spectrogram_batch(clips, n_mels=80)
    assert batch.shape == (3, 80, 3000) and batch.dtype == np.float32
    for row, clip in zip(batch, clips):
        np.testing.assert_array_equal(row, audio.log_mel_spectrogram(clip, n_mels=80))

    longest = audio.log_mel_spectrogram_batch(clips, n_mels=80, pad_or_trim_seconds=None)
    assert longest.shape == (3, 80, 50000 // 160)
    theirs = reference(clips, 80, padding="longest")
    assert float(np.abs(longest - theirs).max()) <= TOL


def test_pad_or_trim():
    x = np.arange(1, 6, dtype=np.float32)
    np.testing.assert_array_equal(audio.pad_or_trim(x, 3), [1, 2, 3])
    np.testing.assert_array_equal(audio.pad_or_trim(x, 7), [1, 2, 3, 4, 5, 0, 0])
    np.testing.assert_array_equal(audio.pad_or_trim(x, 5), x)
    two = audio.pad_or_trim(np.ones((2, 4)), 6)
    assert two.shape == (2, 6) and two[:, 4:].sum() == 0


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros(0, np.float32), "empty"),
        (np.array([0.1, np.nan] * 400, np.float32), "NaN or infinite"),
        (np.array([0.1, np.inf] * 400, np.float32), "NaN or infinite"),
        (np.zeros((2, 1000), np.float32), r"shape \(2, 1000\)"),
        (np.zeros(100, np.float32), "at least 160 samples"),
    ],
    ids=["empty", "nan", "inf", "stereo", "too-short"],
)
def test_log_mel_rejects_bad_arrays(bad, match):
    with pytest.raises(audio.AudioError, match=match):
        audio.log_mel_spectrogram(bad, pad_or_trim_seconds=None)


def test_log_mel_rejects_zero_length_after_trimming_and_bad_batches():
    x = _noise(16000, seed=0)
    with pytest.raises(audio.AudioError, match="at least 160 samples"):
        audio.log_mel_spectrogram(x, pad_or_trim_seconds=0.005)  # 80 samples
    with pytest.raises(audio.AudioError, match="pad_or_trim_seconds"):
        audio.log_mel_spectrogram(x, pad_or_trim_seconds=0.0)
    with pytest.raises(audio.AudioError, match="empty list"):
        audio.log_mel_spectrogram_batch([])
    with pytest.raises(audio.AudioError, match="item 1: audio contains NaN"):
        audio.log_mel_spectrogram_batch([x, np.full(1000, np.nan, np.float32)])


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------


def test_load_real_speech_resamples_to_16k_keeping_duration(speech):
    for path in _speech_files():
        info = sf.info(str(path))
        assert info.samplerate == 22050 and info.subtype == "FLOAT"
        x = speech[path.name]
        assert x.dtype == np.float32 and x.ndim == 1
        assert x.shape[0] == math.ceil(info.frames * 16000 / 22050)
        assert abs(x.shape[0] / 16000 - info.duration) < 1 / 16000
        assert audio.duration_seconds(path) == pytest.approx(info.frames / 22050)
        # The resampled speech keeps its level: RMS within 2 % of the original's.
        original, _ = sf.read(str(path), dtype="float32")
        rms = lambda a: float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))  # noqa: E731
        assert rms(x) == pytest.approx(rms(original), rel=0.02)


@pytest.mark.parametrize("source_rate", [8000, 22050, 44100, 48000])
def test_load_resamples_a_tone_faithfully(tmp_path, source_rate):
    seconds, freq = 1.5, 440.0
    t = np.arange(int(seconds * source_rate)) / source_rate
    path = tmp_path / f"tone_{source_rate}.wav"
    sf.write(path, 0.5 * np.sin(2 * np.pi * freq * t), source_rate, subtype="PCM_24")
    x = audio.load_audio(path)
    assert x.dtype == np.float32
    assert x.shape[0] == math.ceil(t.shape[0] * 16000 / source_rate)
    expected = 0.5 * np.sin(2 * np.pi * freq * np.arange(x.shape[0]) / 16000)
    inner = slice(800, -800)  # the resampler's filter rings at the edges
    assert float(np.abs(x[inner] - expected[inner]).max()) < 2e-3


def test_load_to_other_target_rate(tmp_path):
    path = tmp_path / "noise.flac"
    sf.write(path, _noise(22050, seed=1), 22050)
    x = audio.load_audio(path, sampling_rate=24000)
    assert x.dtype == np.float32 and x.shape == (24000,)


def test_load_mixes_stereo_to_mono(tmp_path):
    left, right = _noise(16000, seed=1), _noise(16000, seed=2)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    np.testing.assert_allclose(audio.load_audio(path), (left + right) / 2, rtol=0, atol=1e-7)

    path48 = tmp_path / "stereo48k.wav"
    sf.write(path48, np.stack([np.zeros(48000), np.full(48000, 0.5)], axis=1), 48000)
    x = audio.load_audio(path48)
    assert x.shape == (16000,)
    np.testing.assert_allclose(x[200:-200], 0.25, atol=1e-3)  # mean of 0 and 0.5


def test_load_int16_wav(tmp_path):
    ints = (np.random.default_rng(0).integers(-32768, 32767, 8000)).astype(np.int16)
    path = tmp_path / "pcm16.wav"
    sf.write(path, ints, 16000, subtype="PCM_16")
    x = audio.load_audio(path)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, ints.astype(np.float32) / 32768.0)
    assert audio.duration_seconds(path) == 0.5


def _bad_files(tmp_path) -> dict[str, tuple[Path, str]]:
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    zero_bytes = tmp_path / "zero_bytes.wav"
    zero_bytes.write_bytes(b"")
    empty = tmp_path / "no_samples.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000, subtype="FLOAT")
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.array([0.1, np.nan, -0.1] * 100, np.float32), 16000, subtype="FLOAT")
    inf = tmp_path / "inf.wav"
    sf.write(inf, np.array([0.1, np.inf, -0.1] * 100, np.float32), 22050, subtype="FLOAT")
    return {
        "missing": (tmp_path / "missing.wav", "does not exist"),
        "directory": (tmp_path, "not a regular file"),
        "garbage": (garbage, "could not be decoded"),
        "zero-bytes": (zero_bytes, r"empty \(0 bytes\)"),
        "no-samples": (empty, "contains no samples"),
        "nan": (nan, "100 NaN or infinite samples"),
        "inf": (inf, "100 NaN or infinite samples"),
    }


@pytest.mark.parametrize(
    "case", ["missing", "directory", "garbage", "zero-bytes", "no-samples", "nan", "inf"]
)
def test_load_rejects_bad_files_naming_them(tmp_path, case):
    path, problem = _bad_files(tmp_path)[case]
    with pytest.raises(audio.AudioError, match=problem) as err:
        audio.load_audio(path)
    assert str(path) in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("case", ["missing", "garbage", "zero-bytes"])
def test_duration_rejects_unreadable_files_naming_them(tmp_path, case):
    path, _ = _bad_files(tmp_path)[case]
    with pytest.raises(audio.AudioError, match=re.escape(str(path))):
        audio.duration_seconds(path)
