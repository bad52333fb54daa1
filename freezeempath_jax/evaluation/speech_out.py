"""Measurements of spoken replies: intelligibility (ASR word error rate against the text
reply) and expressiveness (median F0, loudness, speaking rate), per item and per group.

    word_error_rate("I am here", "i'm here")      -> word-level Levenshtein / reference words
    prosody(audio, words=8)                       -> {"f0_hz", "loudness_db", "rate_wps", ...}

F0 is librosa's YIN (60-400 Hz, 64 ms frames) over the voiced frames (frame RMS within 30 dB
of the clip's loudest frame and an aperiodicity estimate below 0.25); loudness the RMS in dBFS
over those speaking frames; speaking rate the reference words per second of speaking time
(frames within 35 dB of the loudest, so pauses between phrases do not count).
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence

import numpy as np

SAMPLE_RATE = 16000
_HOP = 160  # 10 ms


def normalize_words(text: str) -> List[str]:
    """Lower-case words, punctuation dropped (apostrophes kept inside words)."""
    text = re.sub(r"[^a-z0-9' ]+", " ", (text or "").lower())
    return [w.strip("'") for w in text.split() if w.strip("'")]


def word_errors(reference: str, hypothesis: str) -> tuple:
    """(edit distance in words, reference word count)."""
    r, h = normalize_words(reference), normalize_words(hypothesis)
    d = np.arange(len(h) + 1)
    for i in range(1, len(r) + 1):
        prev, d = d, np.empty_like(d)
        d[0] = i
        for j in range(1, len(h) + 1):
            d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (r[i - 1] != h[j - 1]))
    return int(d[-1]), len(r)


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word error rate of one hypothesis (an empty reference: 0 if the hypothesis is empty
    too, else 1)."""
    e, n = word_errors(reference, hypothesis)
    return e / n if n else float(e > 0)


def _frame_rms(audio: np.ndarray, frame: int = 400) -> np.ndarray:
    n = max(1, 1 + (len(audio) - frame) // _HOP)
    idx = np.arange(n)[:, None] * _HOP + np.arange(frame)[None]
    x = np.pad(audio, (0, max(0, idx.max() + 1 - len(audio))))[idx]
    return np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=1) + 1e-12)


def prosody(audio: np.ndarray, words: Optional[int] = None,
            sampling_rate: int = SAMPLE_RATE) -> Dict[str, float]:
    """Median F0 (Hz), loudness (dBFS over speaking frames), speaking seconds and, given the
    number of words spoken, the speaking rate in words per second."""
    import librosa

    a = np.asarray(audio, np.float32).reshape(-1)
    if sampling_rate != SAMPLE_RATE:
        a = librosa.resample(a, orig_sr=sampling_rate, target_sr=SAMPLE_RATE)
    rms = _frame_rms(a)
    db = 20 * np.log10(rms)
    speaking = db > db.max() - 35.0
    loud = db > db.max() - 30.0
    f0 = librosa.yin(a, fmin=60, fmax=400, sr=SAMPLE_RATE, frame_length=1024,
                     hop_length=_HOP, trough_threshold=0.25)
    # YIN's frames are centred; align with the RMS frames by index
    m = min(len(f0), len(loud))
    voiced = f0[:m][loud[:m] & (f0[:m] < 395) & (f0[:m] > 62)]
    seconds = float(speaking.sum() * _HOP / SAMPLE_RATE)
    out = {"f0_hz": float(np.median(voiced)) if voiced.size else float("nan"),
           "loudness_db": float(20 * np.log10(np.sqrt(np.mean(rms[speaking] ** 2)))),
           "speaking_seconds": seconds}
    if words is not None:
        out["rate_wps"] = float(words / seconds) if seconds > 0 else float("nan")
    return out


def group_stats(rows: Sequence[dict], key: str, fields=("f0_hz", "loudness_db", "rate_wps")
                ) -> Dict[str, Dict[str, float]]:
    """Per value of rows[key]: the median of each field and its count."""
    groups: Dict[str, List[dict]] = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    out = {}
    for g, rs in groups.items():
        out[g] = {"n": len(rs)}
        for f in fields:
            v = np.array([r[f] for r in rs if f in r and np.isfinite(r[f])], np.float64)
            out[g][f] = float(np.median(v)) if v.size else float("nan")
    return out
