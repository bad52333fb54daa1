"""Streaming training input through grain: records stay light, features are made per batch.

The in-memory path of the trainer (`batches.MemorySource`) holds every clip's features on the
host, which is right for the small synthetic corpus and wrong for a 200K-clip speech-
instruction manifest (30 s of log-mel is 1.5 MB a clip in float32). Here the records are
only manifest lines (paths, text, labels, reply ids); each batch is made when grain asks for
it, in its read threads or worker processes:

    step index -> `data.pipeline.BatchPlan` (per-epoch shuffle, global batches, this host's
    rows) -> decode / resample each clip, log-mel on the host -> `batches.BatchBuilder`
    -> this host's share of the global batch (static shapes)

A batch is a pure function of its index, so the iterator state grain keeps (and
`train.checkpointing` stores next to the model) is a few integers: a resumed run reads
exactly the batches an uninterrupted one would. Clips that cannot be read become padding
rows (masked out of every loss and metric) and are counted, never fatal.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Optional, Sequence

import grain
import numpy as np

from freezeempath_jax import audio as audio_lib
from freezeempath_jax.data import pipeline
from freezeempath_jax.train import batches as B_

log = logging.getLogger(__name__)

# Batch keys that stay on the host (bookkeeping, not model input).
SKIPPED = "_skipped"


class StreamBatch:
    """`(index, batch in epoch) -> this host's batch dict` for grain's `map_with_index`.

    Module level and holding only picklable state, so grain can ship it to worker processes.
    `mix_2a` > 0 (stage 2b) marks each row as an emotion-naming (2a) row with that
    probability, drawn from (seed, epoch, record) so that it too depends on the index alone.
    """

    def __init__(self, records: Sequence[Mapping], plan: pipeline.BatchPlan,
                 builder: B_.BatchBuilder, n_mels: int, seconds: float,
                 mix_2a: float = 0.0, seed: int = 0):
        self.records, self.plan, self.builder = list(records), plan, builder
        self.n_mels, self.seconds = int(n_mels), float(seconds)
        self.mix_2a, self.seed = float(mix_2a), int(seed)

    def features(self, rec: Mapping) -> np.ndarray:
        """Log-mel [n_mels, frames] of a record's clip, padded or trimmed to `seconds`."""
        clip = pipeline.decode_record_audio(rec)
        return audio_lib.log_mel_spectrogram(clip, self.n_mels, pad_or_trim_seconds=self.seconds)

    def __call__(self, index: int, batch: int) -> Dict[str, object]:
        epoch = index // len(self.plan)
        rows, _ = self.plan.rows(epoch, batch)
        recs: List[Optional[dict]] = []
        skipped = 0
        for row in rows:
            if row < 0:  # padding of a last partial batch
                recs.append(None)
                continue
            rec = dict(self.records[int(row)])
            try:
                rec["mel"] = self.features(rec)
            except (audio_lib.AudioError, OSError, ValueError, KeyError) as e:
                log.warning("record %s (%s) skipped: %s", rec.get("id", row), rec.get("audio"), e)
                recs.append(None)
                skipped += 1
                continue
            if self.mix_2a > 0:
                u = np.random.default_rng([self.seed, epoch, int(row)]).random()
                rec["task"] = "2a" if u < self.mix_2a else "2b"
            recs.append(rec)
        out = self.builder(recs)
        out[SKIPPED] = np.asarray(skipped, np.int32)
        return out


def make_stream(records: Sequence[Mapping], builder: B_.BatchBuilder, *, batch_size: int,
                n_mels: int, seconds: float, seed: int = 0, mix_2a: float = 0.0,
                num_threads: int = 2, num_workers: int = 0, process_index: int = 0,
                process_count: int = 1) -> grain.DatasetIterator:
    """An endless grain iterator of this host's batches (with `get_state` / `set_state`).

    `batch_size` is global; each host gets `batch_size / process_count` rows of every global
    batch. `num_threads` batches are computed ahead in threads; `num_workers` > 0 moves that
    work into worker processes (scripts then need an `if __name__ == "__main__"` guard).
    """
    if not records:
        raise ValueError("the training manifest holds no usable record")
    cfg = pipeline.PipelineConfig(batch_size=int(batch_size), n_mels=int(n_mels),
                                  seconds=float(seconds), shuffle=True, seed=int(seed),
                                  drop_remainder=True, num_workers=int(num_workers),
                                  num_threads=max(1, int(num_threads)))
    plan = pipeline.BatchPlan(len(records), cfg, None, int(process_index), int(process_count))
    fn = StreamBatch(records, plan, builder, n_mels, seconds, mix_2a=mix_2a, seed=seed)
    ds = grain.MapDataset.range(len(plan)).repeat(None).map_with_index(fn)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                                 prefetch_buffer_size=cfg.num_threads))
    if cfg.num_workers > 0:
        pipeline.mark_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    return iter(it_ds)
