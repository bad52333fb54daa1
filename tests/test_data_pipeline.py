"""grain pipelines: batch contents, bucketing, sharding, padding, bad records, checkpointing."""

import os

import grain
import numpy as np
import pytest
import soundfile as sf
from etils import epath

from freezeempath_jax import audio as audio_lib
from freezeempath_jax.data import builders, pipeline
from freezeempath_jax.data.pipeline import PipelineConfig
from freezeempath_jax.models.configs import EMOTIONS

SR = 16000
ONE_PROCESS = {"process_index": 0, "process_count": 1}


def make_records(n=13, seed=0):
    """In-memory records of varied length and storage (float 16 kHz or 22.05 kHz, int16)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        seconds = [0.6, 1.5, 3.2][i % 3]
        rate = 22050 if i % 4 == 1 else SR
        audio = (0.2 * rng.standard_normal(int(seconds * rate))).astype(np.float32)
        if i % 4 == 2:
            audio = np.round(audio * 32767).astype(np.int16)
        records.append({"id": f"r{i:02d}", "audio": audio, "sampling_rate": rate,
                        "label": i % len(EMOTIONS), "transcript": f"text number {i}",
                        "units": list(range(i))})
    return records


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["id"] == y["id"]
        np.testing.assert_array_equal(x["mel"], y["mel"])
        np.testing.assert_array_equal(x["label"], y["label"])


def tokenize(text):  # module level: picklable for grain workers
    return [ord(c) % 97 + 1 for c in text]


def test_batch_contents_match_the_audio_front_end():
    records = make_records()
    cfg = PipelineConfig(batch_size=4, n_mels=80, seconds=2.0, num_threads=0, max_units=8)
    batch = next(iter(pipeline.make_dataset(records, cfg, **ONE_PROCESS)))
    assert batch["mel"].shape == (4, 80, 200) and batch["mel"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and batch["valid"].all()
    by_id = {r["id"]: r for r in records}
    for k, rid in enumerate(batch["id"]):
        rec = by_id[rid]
        clip = pipeline.decode_record_audio(rec)
        expected = audio_lib.log_mel_spectrogram(clip, n_mels=80, pad_or_trim_seconds=2.0)
        np.testing.assert_allclose(batch["mel"][k], expected, atol=1e-6)
        assert batch["label"][k] == rec["label"] and batch["transcript"][k] == rec["transcript"]
        assert batch["num_samples"][k] == len(clip)
        n_units = min(len(rec["units"]), 8)
        assert batch["units_length"][k] == n_units
        assert batch["units"][k, :n_units].tolist() == rec["units"][:n_units]
    assert np.isnan(batch["attributes"]).all() and batch["attributes"].shape == (4, 3)
    # 22.05 kHz input was resampled: 1.5 s -> 24,000 samples.
    r01 = pipeline.decode_record_audio(by_id["r01"])
    assert len(r01) == 24000


def test_resampling_equals_librosa_soxr_hq():
    librosa = pytest.importorskip("librosa")
    x = make_records(2)[1]
    expected = librosa.resample(x["audio"], orig_sr=22050, target_sr=SR, res_type="soxr_hq")
    np.testing.assert_array_equal(pipeline.decode_record_audio(x), expected)


def test_tokenizer_gives_padded_ids():
    cfg = PipelineConfig(
        batch_size=2, n_mels=80, seconds=1.0, num_threads=0, max_text_len=8, shuffle=False
    )
    ds = pipeline.make_dataset(make_records(4), cfg, tokenizer=tokenize, **ONE_PROCESS)
    batch = next(iter(ds))
    assert "transcript" not in batch
    assert batch["transcript_ids"].shape == (2, 8) and batch["transcript_mask"].all()
    assert batch["transcript_ids"][0].tolist() == tokenize("text number 0")[:8]


def test_epoch_covers_every_record_once_and_pads_the_last_batch():
    records = make_records(13)
    cfg = PipelineConfig(
        batch_size=4, n_mels=80, seconds=1.0, num_threads=0, num_epochs=1, drop_remainder=False
    )
    batches = list(pipeline.make_dataset(records, cfg, **ONE_PROCESS))
    assert len(batches) == 4 == pipeline.batches_per_epoch(records, cfg)
    ids = [i for b in batches for i, v in zip(b["id"], b["valid"]) if v]
    assert sorted(ids) == sorted(r["id"] for r in records)
    assert batches[-1]["valid"].tolist() == [True, False, False, False]
    assert batches[-1]["label"].tolist()[1:] == [-1, -1, -1]
    assert all(b["mel"].shape == (4, 80, 100) for b in batches)
    # Training mode drops the remainder and reshuffles each epoch.
    train = PipelineConfig(batch_size=4, n_mels=80, seconds=1.0, num_threads=0, num_epochs=2)
    tb = list(pipeline.make_dataset(records, train, **ONE_PROCESS))
    assert len(tb) == 6 and all(b["valid"].all() for b in tb)
    assert [b["id"] for b in tb[:3]] != [b["id"] for b in tb[3:]]


def test_length_buckets():
    records = make_records(13)
    cfg = PipelineConfig(
        batch_size=2, n_mels=80, buckets=(1.0, 2.0, 4.0), num_threads=0, num_epochs=1,
        drop_remainder=False,
    )
    batches = list(pipeline.make_dataset(records, cfg, **ONE_PROCESS))
    seen = []
    for b in batches:
        frames = b["mel"].shape[-1]
        assert frames in (100, 200, 400)
        lengths = b["num_samples"][b["valid"]]
        # One bucket per batch: every clip fits it and needs more than the bucket below.
        assert (lengths <= frames * 160).all() and (lengths > (frames // 2) * 160).all()
        seen += [i for i, v in zip(b["id"], b["valid"]) if v]
    assert sorted(seen) == sorted(r["id"] for r in records)
    assert {b["mel"].shape[-1] for b in batches} == {100, 200, 400}


def test_process_shards_partition_each_global_batch():
    records = make_records(16)
    cfg = PipelineConfig(batch_size=4, n_mels=80, buckets=(1.0, 4.0), num_threads=0, num_epochs=1)
    whole = list(pipeline.make_dataset(records, cfg, **ONE_PROCESS))
    halves = [
        list(pipeline.make_dataset(records, cfg, process_index=p, process_count=2)) for p in (0, 1)
    ]
    assert len(halves[0]) == len(halves[1]) == len(whole)
    for w, h0, h1 in zip(whole, *halves):
        assert h0["mel"].shape == h1["mel"].shape == (2,) + w["mel"].shape[1:]
        assert h0["id"] + h1["id"] == w["id"]
        np.testing.assert_array_equal(np.concatenate([h0["mel"], h1["mel"]]), w["mel"])
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.make_dataset(
            records, PipelineConfig(batch_size=3), process_index=0, process_count=2
        )


def test_bad_record_is_masked_not_fatal(tmp_path):
    good = str(tmp_path / "good.wav")
    sf.write(good, 0.1 * np.ones(SR // 2, np.float32), SR)
    bad = str(tmp_path / "bad.wav")
    with open(bad, "wb") as f:
        f.write(b"not audio at all")
    records = [{"id": "good", "audio": good, "label": 1}, {"id": "bad", "audio": bad, "label": 2},
               {"id": "gone", "audio": str(tmp_path / "gone.wav"), "label": 3}]
    cfg = PipelineConfig(batch_size=3, n_mels=80, seconds=1.0, num_threads=0, shuffle=False)
    batch = next(iter(pipeline.make_dataset(records, cfg, **ONE_PROCESS)))
    assert batch["valid"].tolist() == [True, False, False]
    assert batch["label"].tolist() == [1, -1, -1]


def test_iterator_state_resumes_exactly(tmp_path):
    records = make_records(13)
    cfg = PipelineConfig(batch_size=4, n_mels=80, seconds=1.0, num_threads=2)
    ds = pipeline.make_dataset(records, cfg, **ONE_PROCESS)
    reference = take(iter(ds), 8)  # 3 batches per epoch: crosses two epoch boundaries

    it = iter(ds)
    assert_same_batches(take(it, 4), reference[:4])
    pipeline.save_iterator(it, tmp_path / "state.json")
    take(it, 2)  # moves on; the saved state must not
    fresh = iter(pipeline.make_dataset(records, cfg, **ONE_PROCESS))
    resumed = pipeline.restore_iterator(fresh, tmp_path / "state.json")
    assert_same_batches(take(resumed, 4), reference[4:])

    # The same through grain's orbax checkpoint handler.
    it = iter(ds)
    take(it, 5)
    handler = grain.checkpoint.CheckpointHandler()
    (tmp_path / "ckpt").mkdir()
    handler.save(epath.Path(tmp_path / "ckpt"), args=grain.checkpoint.CheckpointSave(it))
    restored = handler.restore(
        epath.Path(tmp_path / "ckpt"), args=grain.checkpoint.CheckpointRestore(iter(ds))
    )
    assert_same_batches(take(restored, 3), reference[5:])


def test_worker_processes_give_the_same_stream_and_resume():
    records = make_records(13)
    base = PipelineConfig(batch_size=4, n_mels=80, seconds=1.0, num_threads=0)
    reference = take(iter(pipeline.make_dataset(records, base, **ONE_PROCESS)), 6)
    cfg = PipelineConfig(batch_size=4, n_mels=80, seconds=1.0, num_threads=0, num_workers=2)
    ds = pipeline.make_dataset(records, cfg, tokenizer=None, **ONE_PROCESS)
    it = iter(ds)
    try:
        assert_same_batches(take(it, 3), reference[:3])
        state = it.get_state()
        take(it, 2)
    finally:
        it.close()
    it2 = iter(pipeline.make_dataset(records, cfg, **ONE_PROCESS))
    try:
        it2.set_state(state)
        assert_same_batches(take(it2, 3), reference[3:6])
    finally:
        it2.close()


def test_tfds_source_with_stored_lengths(tmp_path):
    cfg_synth = builders.SyntheticConfig(
        name="pipe", num_per_emotion=2, split_fractions=(1.0, 0.0, 0.0)
    )
    builder = builders.prepare("synthetic", data_dir=tmp_path / "tfds", config=cfg_synth)
    source = pipeline.tfds_source(builder, "train")
    lengths = source.num_samples()
    assert os.path.isfile(os.path.join(builder.data_dir, "num_samples-train.npy"))
    assert lengths.tolist() == [len(source[i]["audio"]) for i in range(len(source))]
    cfg = PipelineConfig(
        batch_size=2, n_mels=80, buckets=(2.0, 4.0, 8.0), num_threads=0, num_epochs=1,
        drop_remainder=False,
    )
    batches = list(pipeline.make_dataset(source, cfg, **ONE_PROCESS))
    ids = [i for b in batches for i, v in zip(b["id"], b["valid"]) if v]
    assert sorted(ids) == sorted(source[i]["id"].decode() for i in range(len(source)))
    assert all(b["transcript"][0] for b in batches)
    assert {int(b["label"][0]) for b in batches} <= set(range(len(EMOTIONS)))
    with pytest.raises(FileNotFoundError, match="not prepared"):
        pipeline.tfds_source("synthetic", "train", data_dir=tmp_path / "empty", config="tiny")
