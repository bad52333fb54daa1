"""Spoken question answering (OpenAudioBench: Llama Questions, Web Questions, TriviaQA).

Items `{"id", "audio", "answers": [...]}`; a reply is correct when a normalised gold answer
occurs in the normalised reply (`common.answer_in_reply`). Modes:
- "s2t": the reply text is scored;
- "s2s": the spoken reply is scored: units -> waveform (`audio_fn`) -> ASR (`WhisperASR`)
  -> transcript, as the paper transcribes its speech output.

`audio_fn(units, text) -> waveform` (16 kHz float, or a `(waveform, sample_rate)` pair) is the
units-to-waveform decoder; a real one ignores `text`. Until the project's decoder exists,
tests pass a stub that speaks `text` with eSpeak.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import numpy as np
from tqdm import tqdm

from freezeempath_jax.evaluation.common import (SAMPLE_RATE, answer_in_reply, batches,
                                                load_clips, mean_with_ci)

AudioFn = Callable[[Optional[List[int]], str], object]


def _to_16k(out) -> np.ndarray:
    wave, sr = out if isinstance(out, tuple) else (out, SAMPLE_RATE)
    wave = np.asarray(wave, np.float32).reshape(-1)
    if sr != SAMPLE_RATE:
        import librosa
        wave = librosa.resample(wave, orig_sr=sr, target_sr=SAMPLE_RATE)
    return wave


def evaluate_spoken_qa(chat_model, records: List[dict], *, mode: str = "s2t",
                       audio_fn: Optional[AudioFn] = None, asr=None, batch_size: int = 8,
                       max_new_tokens: int = 128, resamples: int = 1000, seed: int = 0,
                       progress: bool = True) -> dict:
    """Accuracy (with a bootstrap interval) of replies to spoken questions. Each record gets
    `reply` (and `reply_transcript` in s2s) and `correct`, or an `error`."""
    if mode not in ("s2t", "s2s"):
        raise ValueError(f"mode={mode!r}: choose s2t or s2s")
    if mode == "s2s" and (audio_fn is None or asr is None):
        raise ValueError("speech-to-speech needs audio_fn (units -> waveform) and asr (a "
                         "WhisperASR or Whisper checkpoint path)")
    if mode == "s2s" and not hasattr(asr, "transcribe"):
        from freezeempath_jax.inference.transcribe import WhisperASR
        asr = WhisperASR.load(asr, batch_size=batch_size)
    for r in records:
        if "error" not in r and not (isinstance(r.get("answers"), list) and r["answers"]):
            r["error"] = "missing field: 'answers' must be a non-empty list"
    good = [r for r in records if "error" not in r]
    clips = load_clips(good)
    pairs = [(r, c) for r, c in zip(good, clips) if c is not None]
    with tqdm(total=len(pairs), desc=f"spoken_qa {mode}", unit="item",
              disable=not progress) as bar:
        for part in batches(pairs, batch_size):
            replies = chat_model.respond([c for _, c in part], max_new_tokens=max_new_tokens,
                                         temperature=0.0, speech=mode == "s2s",
                                         pad_batch_to=batch_size)
            spoken = []
            for (r, _), rep in zip(part, replies):
                r["reply"] = rep.text
                if mode == "s2t":
                    r["correct"] = answer_in_reply(rep.text, r["answers"])
                    continue
                try:
                    if rep.units is None:
                        raise ValueError("the model has no speech decoder (no units)")
                    spoken.append((r, _to_16k(audio_fn(rep.units, rep.text))))
                except Exception as e:  # one reply that cannot be rendered is its own error
                    r["error"] = f"spoken reply: {type(e).__name__}: {e}"
            if spoken:
                for (r, _), text in zip(spoken, asr.transcribe([w for _, w in spoken])):
                    r["reply_transcript"] = text
                    r["correct"] = answer_in_reply(text, r["answers"])
            bar.update(len(part))
    scored = [float(r["correct"]) for r in records if "correct" in r and "error" not in r]
    acc = mean_with_ci(scored, resamples=resamples, seed=seed)
    return {"task": "spoken_qa", "mode": mode, "n": acc["n"],
            "n_errors": sum(1 for r in records if "error" in r), "accuracy": acc["mean"],
            "ci95": {"accuracy": acc["ci"]}}
