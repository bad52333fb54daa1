"""The demo's unit codec (`models.unit_codec`): STFT round trip, fitting that separates
sounds, batching-invariant pure decoding, per-utterance errors, save / load, streaming."""

import numpy as np
import pytest

from freezeempath_jax.models import unit_codec as uc
from freezeempath_jax.models.configs import UnitCodecConfig

SR = 16000
CFG = UnitCodecConfig(codebook_size=8, griffin_lim_iters=16, length_bucket=16)


def _tone(freq, seconds, amp=0.3):
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(x):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * SR / len(x)


def test_stft_round_trip():
    x = np.random.default_rng(0).normal(size=(2, 6400)).astype(np.float32) * 0.1
    f = 6400 // CFG.hop
    y = np.asarray(uc.istft(CFG, uc.stft(CFG, x, f), 6400))
    np.testing.assert_allclose(y[:, :6000], x[:, :6000], atol=1e-4)


@pytest.fixture(scope="module")
def fitted():
    clips = [_tone(f, 0.6) for f in (200, 440, 900, 1800)] * 2
    clips += [np.concatenate([_tone(440, 0.4), _tone(1800, 0.4)])]
    return uc.fit(CFG, clips, iters=10, seed=0)


def test_fit_separates_tones_and_decodes_their_pitch(fitted):
    units = uc.encode_audio(CFG, fitted, [_tone(440, 0.5), _tone(1800, 0.5)])
    assert len(units[0]) == 0.5 * SR // 320
    # steady middles: one tone, one code; different tones, different codes
    a, b = units[0][3:-3], units[1][3:-3]
    assert len(set(a.tolist()) & set(b.tolist())) == 0
    wavs = uc.decode_units(CFG, fitted, units, seed=0)
    assert [len(w) for w in wavs] == [len(u) * 320 for u in units]
    assert abs(_peak_hz(wavs[0][1600:-1600]) - 440) < 40
    assert abs(_peak_hz(wavs[1][1600:-1600]) - 1800) < 40


def test_decode_is_pure_and_batching_invariant(fitted):
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 8, n) for n in (5, 23, 17)]
    together = uc.decode_units(CFG, fitted, seqs, seed=3)
    alone = [uc.decode_units(CFG, fitted, [s], seed=3, first_index=i)[0]
             for i, s in enumerate(seqs)]
    for t, a in zip(together, alone):  # batch shape changes only float rounding
        np.testing.assert_allclose(t, a, atol=1e-5)
    again = uc.decode_units(CFG, fitted, seqs, seed=3)
    np.testing.assert_array_equal(again[1], together[1])
    other = uc.decode_units(CFG, fitted, seqs, seed=4)
    assert not np.array_equal(other[1], together[1])


def test_bad_units_name_the_utterance(fitted):
    with pytest.raises(ValueError, match="utterance 1: empty"):
        uc.decode_units(CFG, fitted, [[1, 2], []])
    with pytest.raises(ValueError, match=r"utterance 0: unit ids \[8\] outside"):
        uc.decode_units(CFG, fitted, [[1, 8]])
    with pytest.raises(ValueError, match="outside"):
        uc.decode_units(CFG, fitted, [[-1]])


def test_save_load_and_voice(fitted, tmp_path):
    from freezeempath_jax.checkpoints.unit_decoder import load_unit_decoder, save_unit_codec
    from freezeempath_jax.inference.voice import Voice

    save_unit_codec(str(tmp_path / "codec"), CFG, fitted)
    cfg, params = load_unit_decoder(str(tmp_path / "codec"))
    assert cfg == CFG
    for k in fitted:
        np.testing.assert_array_equal(np.asarray(params[k]), np.asarray(fitted[k]))
    v = Voice((cfg, params))
    assert v.sampling_rate == SR and v.vocab_size == 8
    chunks = list(v.stream([[1, 2, 3], [4, 5], [6, 7, 0, 1, 2, 3]], chunk_units=4))
    assert [len(c) for c in chunks] == [4 * 320, 4 * 320, 3 * 320]
    with pytest.raises(ValueError, match="empty"):
        v.decode([])


def test_kmeans_recovers_clusters():
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], np.float32)
    x = np.concatenate([c + rng.normal(0, 0.1, (50, 2)) for c in centers]).astype(np.float32)
    c, a = uc.kmeans(x, 3, iters=10, seed=0)
    got = np.sort(np.round(np.asarray(c)).astype(int), axis=0)
    np.testing.assert_array_equal(got, np.sort(centers.astype(int), axis=0))
    assert len(set(np.asarray(a).tolist())) == 3
