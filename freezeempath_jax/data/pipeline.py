"""grain input pipelines: records -> 16 kHz audio -> host log-mels -> static-shape batches.

    source (tfds data source, or a list of record dicts)
      -> batch plan: per epoch, shuffle, optionally bucket by length, cut global batches,
         give each process its rows (multi-host sharding)
      -> per batch: read records, decode / resample audio, log-mel on the host
      -> optional worker processes (`mp_prefetch`; each worker builds whole batches)

Every element of the grain dataset is one finished batch, computed from its index alone, so
the iterator state is a few integers: `iterator.get_state()` / `set_state()` resume exactly,
with or without workers, and `grain.checkpoint.CheckpointSave(iterator)` stores it through
orbax next to the model (`save_iterator` / `restore_iterator` do the same with a JSON file).

Batches are dicts of numpy arrays with static shapes:
  mel [B, n_mels, frames]   (frames = 100 * bucket seconds; 3000 for the default 30 s)
  label [B] int32           (-1 when a record has none)
  valid [B] bool            (False for padding rows of a last partial batch and for
                             records that failed to decode)
  num_samples [B] int32     (clip length before padding)
  attributes [B, 3] float32 (arousal, valence, dominance; NaN when unknown)
  units [B, max_units] int32 and units_length [B]  (when `max_units` > 0)
plus, for each name in `text_fields`, either a list of B strings or, given a tokenizer,
`<name>_ids [B, max_text_len]` int32 and `<name>_mask` bool; `id` is always a list of B strings.
B is the per-process batch (`batch_size // process_count`).

Bucketing (`buckets=(5, 10, 30)` seconds) pads each clip to the smallest bucket that holds
it, so short clips cost less host and device time; a batch holds one bucket only and the
same bucket on every process (hosts stay in lock-step). It needs clip lengths: tfds datasets
built by `builders.py` store them next to the data; record lists give `num_samples` or a
readable file header.

Multiprocessing (`num_workers > 0`): grain starts worker processes, so scripts need an
`if __name__ == "__main__":` guard and any tokenizer must be a module-level (picklable)
function; absl flags are marked parsed here because grain reads them in the workers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from typing import Callable, Dict, List, Optional, Tuple

import grain
import numpy as np

from freezeempath_jax import audio as audio_lib

log = logging.getLogger(__name__)

SAMPLING_RATE = 16000
ATTRIBUTE_DIM = 3


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How batches are made. `batch_size` is global (summed over processes)."""

    batch_size: int = 8
    n_mels: int = 80
    seconds: float = 30.0  # pad or trim every clip to this without buckets
    buckets: Optional[Tuple[float, ...]] = None  # ascending bucket lengths in seconds
    shuffle: bool = True
    seed: int = 0
    num_epochs: Optional[int] = None  # None repeats forever
    drop_remainder: bool = True  # False pads the last batch (valid=False rows)
    num_workers: int = 0  # worker processes; 0 computes batches in threads of this process
    worker_buffer_size: int = 2  # batches each worker computes ahead
    num_threads: int = 2  # read-ahead threads (per process or worker)
    text_fields: Tuple[str, ...] = ("transcript",)
    max_text_len: int = 64
    text_pad_id: int = 0
    max_units: int = 0

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.buckets is not None:
            b = tuple(float(x) for x in self.buckets)
            if not b or any(x <= 0 for x in b) or list(b) != sorted(set(b)):
                raise ValueError(f"buckets must be ascending positive seconds, got {self.buckets}")
            object.__setattr__(self, "buckets", b)


# ---------------------------------------------------------------------------------------
# Sources


class TfdsSource(Sequence):
    """A tfds array_record data source plus the clip lengths written by `builders.py`."""

    def __init__(self, builder, split: str):
        self.builder = builder
        self.split = split
        self.source = builder.as_data_source(split)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        return self.source[index]

    def num_samples(self) -> np.ndarray:
        """Clip lengths in samples, from the per-split files when the split is plain or `a+b`."""
        from freezeempath_jax.data.builders import LENGTHS_FILE

        parts = self.split.split("+")
        folder = os.fspath(self.builder.data_dir)
        paths = [os.path.join(folder, LENGTHS_FILE.format(split=p)) for p in parts]
        if all(os.path.isfile(p) for p in paths):
            lengths = np.concatenate([np.load(p) for p in paths])
            if len(lengths) == len(self):
                return lengths
        log.warning("no stored lengths for split %r: reading every record once", self.split)
        return np.array([len(self.source[i]["audio"]) for i in range(len(self))], np.int64)


def tfds_source(name_or_builder, split: str, data_dir=None, **builder_kwargs) -> TfdsSource:
    """A `TfdsSource` for a prepared dataset: a builder, or a name of `builders.BUILDERS`."""
    builder = name_or_builder
    if isinstance(name_or_builder, str):
        from freezeempath_jax.data.builders import BUILDERS

        if name_or_builder not in BUILDERS:
            raise ValueError(
                f"unknown dataset {name_or_builder!r}; expected one of {sorted(BUILDERS)}"
            )
        builder = BUILDERS[name_or_builder](data_dir=data_dir, **builder_kwargs)
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"dataset {builder.name} is not prepared in {builder.data_dir}; "
                f"run builders.prepare({name_or_builder!r}, ...) first"
            )
    return TfdsSource(builder, split)


def _record_num_samples(record) -> int:
    if "num_samples" in record:
        return int(record["num_samples"])
    audio = record["audio"]
    if isinstance(audio, (str, os.PathLike)):
        try:
            return int(round(audio_lib.duration_seconds(audio) * SAMPLING_RATE))
        except audio_lib.AudioError:
            return 0  # fails again when decoded and becomes an invalid row
    rate = record.get("sampling_rate", SAMPLING_RATE)
    return int(round(len(audio) * SAMPLING_RATE / rate))


def source_num_samples(source) -> np.ndarray:
    """Clip lengths (16 kHz samples) of every record of `source`."""
    if hasattr(source, "num_samples"):
        return np.asarray(source.num_samples(), np.int64)
    return np.array([_record_num_samples(source[i]) for i in range(len(source))], np.int64)


# ---------------------------------------------------------------------------------------
# Batch plan


class BatchPlan:
    """Which records make batch b of epoch e on this process: a pure function of its inputs.

    Global batches are cut per epoch (shuffled with `(seed, epoch)`, within buckets when
    bucketing); this process takes rows `[p * B, (p + 1) * B)` of each, B = batch_size /
    process_count. Row index -1 is padding.
    """

    def __init__(
        self,
        num_records: int,
        config: PipelineConfig,
        num_samples: Optional[np.ndarray] = None,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if config.batch_size % process_count:
            raise ValueError(
                f"batch_size {config.batch_size} is not divisible by process_count {process_count}"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} outside [0, {process_count})")
        self.config = config
        self.num_records = num_records
        self.process_index = process_index
        self.process_count = process_count
        self.local_batch = config.batch_size // process_count
        if config.buckets is None:
            self.bucket_of = np.zeros(num_records, np.int64)
            self.bucket_seconds = (config.seconds,)
        else:
            if num_samples is None or len(num_samples) != num_records:
                raise ValueError("bucketing needs the length of every record")
            limits = np.array(config.buckets) * SAMPLING_RATE
            # Clips longer than the last bucket go into it and are trimmed.
            bucket = np.searchsorted(limits, num_samples, side="left")
            self.bucket_of = np.minimum(bucket, len(limits) - 1)
            self.bucket_seconds = config.buckets
        self._num_batches = len(self._epoch(0))
        if self._num_batches == 0:
            raise ValueError(
                f"{num_records} records make no batch of {config.batch_size} "
                f"(drop_remainder={config.drop_remainder}, buckets={config.buckets})"
            )

    def __len__(self) -> int:
        """Batches per epoch (the same every epoch)."""
        return self._num_batches

    def _epoch(self, epoch: int) -> List[Tuple[np.ndarray, int]]:
        # Per-instance cache of the last two epochs (a worker straddles at most one boundary).
        cache = self.__dict__.setdefault("_epoch_cache", {})
        if epoch not in cache:
            if len(cache) >= 2:
                cache.pop(min(cache))
            cache[epoch] = self._make_epoch(epoch)
        return cache[epoch]

    def _make_epoch(self, epoch: int) -> List[Tuple[np.ndarray, int]]:
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, epoch])
        batches = []
        for bucket in range(len(self.bucket_seconds)):
            members = np.flatnonzero(self.bucket_of == bucket)
            if cfg.shuffle:
                members = rng.permutation(members)
            for start in range(0, len(members), cfg.batch_size):
                rows = members[start : start + cfg.batch_size]
                if len(rows) < cfg.batch_size:
                    if cfg.drop_remainder:
                        continue
                    rows = np.concatenate([rows, np.full(cfg.batch_size - len(rows), -1)])
                batches.append((rows, bucket))
        if cfg.shuffle and len(self.bucket_seconds) > 1:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def rows(self, epoch: int, batch: int) -> Tuple[np.ndarray, float]:
        """This process's record indices (-1 = padding) and the batch's length in seconds."""
        rows, bucket = self._epoch(epoch)[batch]
        lo = self.process_index * self.local_batch
        return rows[lo : lo + self.local_batch], self.bucket_seconds[bucket]


# ---------------------------------------------------------------------------------------
# Batch assembly


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype == object:
        value = value.item()
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    return str(value)


def decode_record_audio(record) -> np.ndarray:
    """float32 16 kHz samples of a record: int16 tfds samples, a file path or an array."""
    audio = record["audio"]
    if isinstance(audio, (str, os.PathLike)):
        return audio_lib.load_audio(audio, SAMPLING_RATE)
    audio = np.asarray(audio)
    if audio.dtype == np.int16:
        return audio.astype(np.float32) / 32767.0
    audio = audio.astype(np.float32)
    rate = int(record.get("sampling_rate", SAMPLING_RATE))
    if rate != SAMPLING_RATE:
        import soxr  # what librosa.resample(res_type="soxr_hq") runs, without librosa's import

        audio = soxr.resample(audio, rate, SAMPLING_RATE, quality="HQ").astype(np.float32)
    return audio


class MakeBatch:
    """`(global index, batch index) -> batch dict`: the one transform of the pipeline.

    Module level and holding only picklable state, so grain can ship it to workers.
    """

    def __init__(
        self,
        source,
        plan: BatchPlan,
        tokenizer: Optional[Callable[[str], Sequence[int]]] = None,
    ):
        self.source = source
        self.plan = plan
        self.tokenizer = tokenizer

    def __call__(self, index: int, batch: int) -> Dict[str, object]:
        cfg = self.plan.config
        rows, seconds = self.plan.rows(index // len(self.plan), batch)
        records, clips, valid = [], [], np.zeros(len(rows), bool)
        for k, row in enumerate(rows):
            record, clip = None, None
            if row >= 0:
                try:
                    record = self.source[int(row)]
                    clip = decode_record_audio(record)
                    if clip.size == 0:
                        raise audio_lib.AudioError("no samples")
                    valid[k] = True
                except (audio_lib.AudioError, OSError, ValueError, KeyError) as e:
                    log.warning("record %d could not be used and is masked out: %s", row, e)
                    record, clip = None, None
            records.append(record or {})
            clips.append(clip if clip is not None else np.zeros(audio_lib.HOP_LENGTH, np.float32))
        mel = audio_lib.log_mel_spectrogram_batch(
            clips, n_mels=cfg.n_mels, pad_or_trim_seconds=seconds
        )
        labels = [int(r.get("label", -1)) if v else -1 for r, v in zip(records, valid)]
        out: Dict[str, object] = {
            "mel": mel,
            "label": np.array(labels, np.int32),
            "valid": valid,
            "num_samples": np.array([len(c) if v else 0 for c, v in zip(clips, valid)], np.int32),
            "attributes": np.stack([self._attributes(r) for r in records]).astype(np.float32),
            "id": [_text(r.get("id")) for r in records],
        }
        for name in cfg.text_fields:
            texts = [_text(r.get(name)) for r in records]
            if self.tokenizer is None:
                out[name] = texts
            else:
                ids = np.full((len(texts), cfg.max_text_len), cfg.text_pad_id, np.int32)
                mask = np.zeros((len(texts), cfg.max_text_len), bool)
                for k, text in enumerate(texts):
                    tokens = list(self.tokenizer(text))[: cfg.max_text_len] if text else []
                    ids[k, : len(tokens)] = tokens
                    mask[k, : len(tokens)] = True
                out[f"{name}_ids"], out[f"{name}_mask"] = ids, mask
        if cfg.max_units > 0:
            units = np.zeros((len(records), cfg.max_units), np.int32)
            lengths = np.zeros(len(records), np.int32)
            for k, r in enumerate(records):
                u = r.get("units")
                u = np.asarray(u if u is not None else [], np.int32)[: cfg.max_units]
                units[k, : len(u)], lengths[k] = u, len(u)
            out["units"], out["units_length"] = units, lengths
        return out

    @staticmethod
    def _attributes(record) -> np.ndarray:
        value = record.get("attributes")
        if isinstance(value, dict):
            from freezeempath_jax.data.ser_corpora import ATTRIBUTES

            return np.array([value.get(k, np.nan) for k in ATTRIBUTES], np.float32)
        if value is None:
            return np.full(ATTRIBUTE_DIM, np.nan, np.float32)
        return np.asarray(value, np.float32).reshape(ATTRIBUTE_DIM)


# ---------------------------------------------------------------------------------------
# Datasets and iterators


def _process_index_and_count(process_index, process_count) -> Tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return int(process_index), int(process_count)


def make_dataset(
    source,
    config: PipelineConfig,
    *,
    tokenizer: Optional[Callable[[str], Sequence[int]]] = None,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> grain.IterDataset:
    """A grain `IterDataset` of batch dicts (see the module docstring) from `source`.

    Args:
      source: random-access records: a `TfdsSource` / tfds data source, or a list of dicts
        with `audio` (path, int16 or float array) and optional label, transcript, ...
      config: batch size (global), features, bucketing, shuffling, epochs, workers.
      tokenizer: module-level `str -> ids`; text fields then come as padded id arrays.
      process_index, process_count: this host's shard; default `jax.process_index()` and
        `jax.process_count()`.
    """
    if len(source) == 0:
        raise ValueError("the data source holds no records")
    index, count = _process_index_and_count(process_index, process_count)
    num_samples = source_num_samples(source) if config.buckets is not None else None
    plan = BatchPlan(len(source), config, num_samples, index, count)
    ds = grain.MapDataset.range(len(plan)).repeat(config.num_epochs)
    ds = ds.map_with_index(MakeBatch(source, plan, tokenizer))
    iter_ds = ds.to_iter_dataset(
        grain.ReadOptions(
            num_threads=config.num_threads, prefetch_buffer_size=max(1, config.num_threads)
        )
    )
    if config.num_workers > 0:
        mark_absl_flags_parsed()
        iter_ds = iter_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer_size
            )
        )
    return iter_ds


def mark_absl_flags_parsed() -> None:
    """Marks absl flags parsed: grain's worker processes read them, and outside an absl app
    (tests, notebooks) they are unparsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def batches_per_epoch(
    source, config: PipelineConfig, process_index: int = 0, process_count: int = 1
) -> int:
    """Number of batches one epoch of `source` makes under `config`."""
    num_samples = source_num_samples(source) if config.buckets is not None else None
    return len(BatchPlan(len(source), config, num_samples, process_index, process_count))


def save_iterator(iterator, path: str | os.PathLike) -> None:
    """Writes `iterator.get_state()` as JSON (what grain's orbax handler stores too)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(iterator.get_state(), f)


def restore_iterator(iterator, path: str | os.PathLike):
    """Sets `iterator` to the state saved by `save_iterator`; returns it."""
    with open(path, encoding="utf-8") as f:
        iterator.set_state(json.load(f))
    return iterator
