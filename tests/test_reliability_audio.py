"""Issue 17: corrupt audio is an `AudioError` naming the file, never NaN features or a crash.

The fuzz test mutates short WAVs (excerpts of the shared real speech when present, plus
files written here) from a fixed seed and decodes each in a separate worker process, so a
crash or a hang inside libsndfile is caught and reported instead of taking pytest down.
"""

from __future__ import annotations

import json
import selectors
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from freezeempath_jax import audio

REPO = Path(__file__).resolve().parents[1]
SHARED_AUDIO = REPO.parent / "shared" / "audio"


def _float_wav(path: Path, samples, rate: int = 22050) -> Path:
    sf.write(path, np.asarray(samples, np.float32), rate, subtype="FLOAT")
    return path


def _set_rate(path: Path, rate: int) -> None:
    data = bytearray(path.read_bytes())
    fmt = data.index(b"fmt ")
    data[fmt + 12 : fmt + 16] = struct.pack("<I", rate)
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------
# The reported cases, with their exact messages
# ---------------------------------------------------------------------------------------


def test_flipped_exponent_bit_in_a_float_wav_is_an_error_not_a_nan_mel(tmp_path):
    x = 0.1 * np.sin(np.arange(8000) / 5.0)
    x[1234] = -8.7e37  # what one flipped exponent bit made of a speech sample
    path = _float_wav(tmp_path / "flipped.wav", x, rate=16000)
    with pytest.raises(audio.AudioError) as err:
        audio.load_audio(path)
    assert str(err.value) == (
        f"audio file {str(path)!r} has samples up to 8.7e+37 in magnitude, beyond 1000 "
        "(full scale is 1.0): corrupt data, or float samples at integer scale"
    )


def test_huge_stereo_and_resampled_samples_never_come_back_as_inf(tmp_path):
    # Both used to overflow: the channel mean (3e38 + 3e38) and soxr's filter.
    stereo = _float_wav(tmp_path / "stereo.wav", np.full((4000, 2), 3e38), rate=16000)
    resampled = _float_wav(tmp_path / "resampled.wav", np.full(4000, 3e38), rate=22050)
    for path in (stereo, resampled):
        with pytest.raises(audio.AudioError) as err:
            audio.load_audio(path)
        assert str(err.value) == (
            f"audio file {str(path)!r} has samples up to 3e+38 in magnitude, beyond 1000 "
            "(full scale is 1.0): corrupt data, or float samples at integer scale"
        )


def test_loud_but_plausible_float_audio_still_loads(tmp_path):
    path = _float_wav(tmp_path / "hot.wav", 40.0 * np.sin(np.arange(8000) / 5.0), rate=16000)
    x = audio.load_audio(path)
    assert np.isfinite(x).all() and np.isfinite(audio.log_mel_spectrogram(x)).all()


@pytest.mark.parametrize(
    "value, expected",
    [
        (-8.7e37, "log_mel_spectrogram: audio of shape (1600,) has samples up to 8.7e+37 in "
                  "magnitude, beyond 1000 (full scale is 1.0): corrupt data, or float samples "
                  "at integer scale"),
        (np.nan, "log_mel_spectrogram: audio contains NaN or infinite samples "
                 "(1 of shape (1600,))"),
        (-np.inf, "log_mel_spectrogram: audio contains NaN or infinite samples "
                  "(1 of shape (1600,))"),
    ],
    ids=["huge", "nan", "inf"],
)
def test_log_mel_of_an_absurd_array_names_its_shape(value, expected):
    x = np.zeros(1600, np.float32)
    x[7] = value
    with pytest.raises(audio.AudioError) as err:
        audio.log_mel_spectrogram(x)
    assert str(err.value) == expected


@pytest.mark.parametrize("rate", [1, 999, 384001, 0x7FFFFFFF])
def test_absurd_header_sampling_rate_is_rejected_before_decoding(tmp_path, rate):
    # 190 KB at a claimed 1 Hz used to resample into 761,856,000 samples (6.2 GB, 15 s,
    # then a raw MemoryError).
    path = _float_wav(tmp_path / "rate.wav", np.zeros(47616), rate=22050)
    _set_rate(path, rate)
    start = time.perf_counter()
    with pytest.raises(audio.AudioError) as err:
        audio.load_audio(path)
    assert time.perf_counter() - start < 1.0
    assert str(err.value) == (
        f"audio file {str(path)!r} reports sampling rate {rate} Hz, outside 1000-384000 Hz; "
        "its header is probably corrupt"
    )
    with pytest.raises(audio.AudioError, match="its header is probably corrupt"):
        audio.duration_seconds(path)


def test_duration_beyond_max_seconds_is_rejected_before_decoding(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, np.zeros(3 * 16000, np.int16), 16000, subtype="PCM_16")
    with pytest.raises(audio.AudioError) as err:
        audio.load_audio(path, max_seconds=2.5)
    assert str(err.value) == (
        f"audio file {str(path)!r} lasts 3.0 s (48000 frames at 16000 Hz), more than "
        "max_seconds=2.5"
    )
    assert audio.load_audio(path, max_seconds=None).shape == (48000,)
    assert audio.load_audio(path).shape == (48000,)  # the default bound is an hour


# ---------------------------------------------------------------------------------------
# Fuzz
# ---------------------------------------------------------------------------------------

NUM_FUZZ = 1200
PER_INPUT_TIMEOUT_S = 15.0

# Decodes each path read from stdin and answers one JSON line per path.
_WORKER = r"""
import json, sys
import numpy as np
from freezeempath_jax import audio
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    path = line.rstrip("\n")
    try:
        x = audio.load_audio(path)
    except audio.AudioError as e:
        result = {"kind": "audio_error", "message": str(e)}
    except BaseException as e:
        result = {"kind": "other", "message": f"{type(e).__name__}: {e}"}
    else:
        result = {"kind": "finite", "samples": int(x.size)}
        if x.dtype != np.float32 or x.ndim != 1 or not np.isfinite(x).all():
            result = {"kind": "non-finite audio", "message": f"{x.dtype} {x.shape}"}
        else:
            try:
                mel = audio.log_mel_spectrogram(x, n_mels=80)
                if not np.isfinite(mel).all():
                    result = {"kind": "non-finite mel", "message": ""}
            except BaseException as e:
                result = {"kind": "mel raised", "message": f"{type(e).__name__}: {e}"}
    print(json.dumps(result), flush=True)
"""


class _Worker:
    """A decoding subprocess with a per-input timeout; restarted after a crash or a hang."""

    def __init__(self, log: Path):
        self.log = log
        self.proc = None

    def _start(self):
        # Run from the repository root: `python -c` imports the package found there first.
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER], cwd=REPO,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(self.log, "ab"), text=True, bufsize=1,
        )
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)
        assert json.loads(self._readline(120.0))["ready"]

    def _readline(self, timeout: float) -> str | None:
        if not self.selector.select(timeout):
            return None
        return self.proc.stdout.readline() or None

    def _stop(self):
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def run(self, path: Path) -> dict:
        if self.proc is None:
            self._start()
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        start = time.perf_counter()
        line = self._readline(PER_INPUT_TIMEOUT_S)
        if line is None:
            exited = self.proc.poll() is not None
            self._stop()
            kind = "crash" if exited else "hang"
            return {"kind": kind, "message": f"after {time.perf_counter() - start:.1f} s"}
        return json.loads(line)

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def _sources(tmp_path: Path, rng: np.random.Generator) -> list[bytes]:
    """Short valid files to mutate: real speech excerpts plus synthetic WAVs and a FLAC."""
    out = []
    t = np.arange(16000) / 16000
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)

    def encode(samples, rate, subtype, fmt="WAV"):
        path = tmp_path / f"source{len(out)}.{fmt.lower()}"
        sf.write(path, samples, rate, subtype=subtype, format=fmt)
        out.append(path.read_bytes())

    for wav in sorted(SHARED_AUDIO.glob("*.wav")) if SHARED_AUDIO.is_dir() else []:
        speech, rate = sf.read(wav, dtype="float32")
        start = int(rng.integers(0, max(1, len(speech) - rate)))
        encode(speech[start : start + rate], rate, "FLOAT")  # 1 s, as stored: 22.05 kHz float
    encode(tone, 16000, "PCM_16")
    encode(tone[:8000], 16000, "FLOAT")
    encode(np.stack([tone, -tone], axis=1)[:12000], 44100, "PCM_16")
    encode(tone[:8000], 8000, "PCM_24")
    encode(tone[:8000], 16000, "PCM_U8")
    encode(tone[:8000], 16000, "PCM_16", fmt="FLAC")
    return out


_HEADER_VALUES = [0, 1, 2, 3, 7, 255, 999, 1000, 8000, 65535, 384000, 0x7FFFFFFF, 0xFFFFFFFF]


def _mutate(source: bytes, rng: np.random.Generator, kind: int) -> bytes:
    data = bytearray(source)
    if kind == 0:  # a few random bit flips anywhere
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 9))):
            data[pos] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # bit flips in the first 128 bytes: headers and the first samples
        for pos in rng.integers(0, min(128, len(data)), size=int(rng.integers(1, 4))):
            data[pos] ^= 1 << int(rng.integers(8))
    elif kind == 2:  # truncation
        del data[int(rng.integers(0, len(data))) :]
    elif kind == 3 and b"fmt " in data:  # one header field set to an edge value
        fmt = data.index(b"fmt ")
        offset, size = [(10, 2), (12, 4), (16, 4), (20, 2), (22, 2), (8, 2), (4, 4)][
            int(rng.integers(7))
        ]
        value = _HEADER_VALUES[int(rng.integers(len(_HEADER_VALUES)))]
        value = value if rng.uniform() < 0.8 else int(rng.integers(0, 2**32))
        data[fmt + offset : fmt + offset + size] = (value % 2**(8 * size)).to_bytes(size, "little")
        if rng.uniform() < 0.3 and b"data" in data:  # and sometimes the data chunk's size
            pos = data.index(b"data") + 4
            data[pos : pos + 4] = int(rng.integers(0, 2**32)).to_bytes(4, "little")
    elif kind == 4:  # absurd float values written over samples (float sources only)
        if b"data" in data:
            start = data.index(b"data") + 8
            values = [np.nan, np.inf, -np.inf, -8.7e37, 3.4e38, 1e5, 1001.0, 999.0, -1e-40]
            for _ in range(int(rng.integers(1, 4))):
                pos = start + 4 * int(rng.integers(0, max(1, (len(data) - start) // 4 - 1)))
                value = values[int(rng.integers(len(values)))]
                data[pos : pos + 4] = struct.pack("<f", value)
    else:  # random bytes, half of them behind a plausible RIFF/WAVE start
        noise = rng.bytes(int(rng.integers(0, 4096)))
        data = bytearray(source[:44] + noise if rng.uniform() < 0.5 else noise)
    return bytes(data)


def test_fuzzed_audio_is_finite_or_an_audio_error_naming_the_file(tmp_path):
    rng = np.random.default_rng(1717)
    sources = _sources(tmp_path, rng)
    cases = []
    for i in range(NUM_FUZZ):
        source = sources[i % len(sources)]
        path = tmp_path / f"fuzz{i:04d}.wav"
        path.write_bytes(_mutate(source, rng, kind=i % 6))
        cases.append(path)

    worker = _Worker(tmp_path / "worker.log")
    results, failures = {}, []
    start = time.perf_counter()
    try:
        for path in cases:
            result = worker.run(path)
            kind = result["kind"]
            results[kind] = results.get(kind, 0) + 1
            named = kind == "audio_error" and str(path) in result["message"]
            if kind not in ("finite", "audio_error") or (kind == "audio_error" and not named):
                failures.append((path.name, kind, result.get("message")))
    finally:
        worker.close()
    elapsed = time.perf_counter() - start
    print(f"fuzz: {NUM_FUZZ} inputs in {elapsed:.1f} s: {results}")
    assert not failures, failures[:20]
    # Both outcomes must be common, or the mutations are not testing what they should.
    assert results["finite"] > 200 and results["audio_error"] > 200, results
