"""Synthetic emotional speech (eSpeak NG via espeakng-loader): determinism, format, learnability."""

import json
import os

import numpy as np
import pytest
import soundfile as sf

from freezeempath_jax.data import builders, synthetic
from freezeempath_jax.models.configs import EMOTIONS

pytest.importorskip("espeakng_loader")


def prosody(audio: np.ndarray, text: str) -> np.ndarray:
    """[log median F0, spread of log F0, log RMS, log frames per character] over voiced frames.

    F0 comes from the autocorrelation peak between 60 and 500 Hz of 64 ms frames.
    """
    frames = np.lib.stride_tricks.sliding_window_view(audio, 1024)[::256]
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
    voiced = rms > 0.1 * rms.max()
    spec = np.fft.rfft(frames[voiced] * np.hanning(1024), n=2048, axis=1)
    autocorr = np.fft.irfft(np.abs(spec) ** 2, axis=1)
    lo, hi = 16000 // 500, 16000 // 60
    lag = np.argmax(autocorr[:, lo : hi + 1], axis=1) + lo
    log_f0 = np.log(16000.0 / lag)
    frames_per_char = voiced.sum() / len(text)
    return np.array(
        [np.median(log_f0), np.std(log_f0), np.log(rms[voiced].mean()), np.log(frames_per_char)]
    )


def nearest_centroid_loo(features: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out accuracy of a nearest-centroid classifier."""
    correct = 0
    for i in range(len(features)):
        rest = np.arange(len(features)) != i
        centroids = np.stack([features[rest & (labels == k)].mean(0) for k in range(len(EMOTIONS))])
        correct += int(np.argmin(((centroids - features[i]) ** 2).sum(1)) == labels[i])
    return correct / len(features)


def test_synthesize_is_a_pure_function_of_its_arguments():
    text = "How do I bake a loaf of bread at home?"
    first = synthetic.synthesize(text, "happy", "en-us+f2", seed=3)
    # eSpeak keeps waveform state across calls in C statics; other renders in between must
    # not change the clip (the render server forks a clean process per clip).
    synthetic.synthesize("Something else entirely!", "angry", "en+m1", seed=9)
    synthetic.render_espeak("And one more sentence.", "en-us", rate=300)
    again = synthetic.synthesize(text, "happy", "en-us+f2", seed=3)
    np.testing.assert_array_equal(first, again)
    assert first.dtype == np.float32 and first.ndim == 1
    assert 0.8 < len(first) / synthetic.SAMPLING_RATE < 8.0
    assert np.isfinite(first).all() and np.abs(first).max() <= 1.0 and np.abs(first).max() > 0.05
    other_seed = synthetic.synthesize(text, "happy", "en-us+f2", seed=4)
    assert not np.array_equal(first, other_seed)
    zh = synthetic.synthesize("我今天真的很开心。", "happy", "cmn", seed=1)
    assert len(zh) > 0.5 * synthetic.SAMPLING_RATE and np.abs(zh).max() > 0.05


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown emotion 'bored'"):
        synthetic.synthesize("Hello.", "bored")
    with pytest.raises(synthetic.SynthesisError, match="no voice 'xx-nowhere'"):
        synthetic.synthesize("Hello.", "sad", voice="xx-nowhere")
    # The server survives a failed request.
    assert synthetic.synthesize("Hello.", "sad", voice="en-us").size > 0
    with pytest.raises(ValueError, match="unknown language"):
        synthetic.synthetic_plan(2, languages=("de",))


def test_prosody_separates_the_five_classes():
    voices = ("en-us+m3", "en-us+f2")
    sentences = synthetic.NEUTRAL_INSTRUCTIONS["en"][:4]  # same words in every emotion
    feats, labels, voice_of = [], [], []
    for v, voice in enumerate(voices):
        for k, emotion in enumerate(EMOTIONS):
            for j, text in enumerate(sentences):
                audio = synthetic.synthesize(text, emotion, voice, seed=100 * v + 10 * k + j)
                feats.append(prosody(audio, text))
                labels.append(k)
                voice_of.append(v)
    feats, labels, voice_of = np.array(feats), np.array(labels), np.array(voice_of)
    # Per-voice standardisation, as speaker normalisation in SER.
    per_voice = feats.copy()
    for v in range(len(voices)):
        m = voice_of == v
        per_voice[m] = (feats[m] - feats[m].mean(0)) / feats[m].std(0)
    acc = nearest_centroid_loo(per_voice, labels)
    # Loudness and rate alone do not depend on the voice: standardised over both voices.
    voice_free = (feats[:, 2:] - feats[:, 2:].mean(0)) / feats[:, 2:].std(0)
    acc_voice_free = nearest_centroid_loo(voice_free, labels)
    print(f"nearest centroid: per-voice {acc:.3f}, loudness+rate only {acc_voice_free:.3f}")
    assert acc >= 0.85
    assert acc_voice_free >= 0.8


def test_corpus_is_deterministic_and_complete(tmp_path):
    thirds = (0.34, 0.33, 0.33)
    a = synthetic.build_synthetic_corpus(tmp_path / "a", 3, seed=5, split_fractions=thirds)
    b = synthetic.build_synthetic_corpus(tmp_path / "b", 3, seed=5, split_fractions=thirds)
    assert set(a) == {"train", "validation", "test"}
    rows_a = [json.loads(l) for s in ("train", "validation", "test") for l in open(a[s])]
    rows_b = [json.loads(l) for s in ("train", "validation", "test") for l in open(b[s])]
    assert len(rows_a) == 15
    for ra, rb in zip(rows_a, rows_b):
        ra_meta = {k: v for k, v in ra.items() if k != "audio"}
        assert ra_meta == {k: v for k, v in rb.items() if k != "audio"}
        np.testing.assert_array_equal(
            sf.read(ra["audio"], dtype="int16")[0], sf.read(rb["audio"], dtype="int16")[0]
        )
        assert ra["label"] == EMOTIONS.index(ra["emotion"])
        assert set(ra) >= {
            "id", "audio", "transcript", "emotion", "label", "speaker", "voice", "language", "split"
        }
        assert sf.info(ra["audio"]).samplerate == 16000 and os.path.isabs(ra["audio"])
    for split in ("train", "validation", "test"):
        assert {r["emotion"] for r in rows_a if r["split"] == split} == set(EMOTIONS)
    c = synthetic.build_synthetic_corpus(tmp_path / "c", 3, seed=6, split_fractions=thirds)
    rows_c = [json.loads(l) for s in ("train", "validation", "test") for l in open(c[s])]
    assert [r["transcript"] for r in rows_c] != [r["transcript"] for r in rows_a]


def test_synthetic_tfds_builder_matches_render(tmp_path):
    config = builders.SyntheticConfig(
        name="test", num_per_emotion=2, languages=("en", "zh"), split_fractions=(0.5, 0.0, 0.5)
    )
    b = builders.prepare("synthetic", data_dir=tmp_path / "tfds", config=config)
    plan = {r["id"]: r for r in synthetic.synthetic_plan(2, ("en", "zh"), 0, (0.5, 0.0, 0.5))}
    assert set(b.info.splits) == {"train", "test"}
    src = b.as_data_source("train+test")
    assert len(src) == 20
    for i in (0, 7):
        ex = src[i]
        rec = plan[ex["id"].decode()]
        expected = builders.float_to_int16(synthetic.render_synthetic(rec))
        np.testing.assert_array_equal(ex["audio"], expected)
        assert ex["label"] == rec["label"] and ex["language"].decode() == rec["language"]
        assert ex["transcript"].decode() == rec["transcript"]
