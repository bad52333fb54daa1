"""Host input throughput: clips/s of the grain pipeline (`data.pipeline.make_dataset`: read,
decode, resample to 16 kHz, log-mel on the host, batch), against transformers'
`WhisperFeatureExtractor` doing the same work (read + resample with librosa + features) in the
same run (a script, not a test).

    python benchmarks/bench_pipeline.py                       # ../shared/audio, 30 s features
    python benchmarks/bench_pipeline.py --audio-dir DIR --workers 0,2 --batches 20

The clips are the real spoken questions of `../shared/audio` (22,050 Hz float WAV, so every
clip is resampled), repeated to fill `--batches` batches of `--batch-size`. Each
configuration first computes a few batches untimed (worker start-up, file cache), then
`--batches` timed ones.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import machine  # noqa: E402  (same folder)


def reference_clips_per_s(paths, n_mels: int, seconds: float) -> float:
    """transformers: librosa load + resample, then WhisperFeatureExtractor, clip by clip."""
    import librosa
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=n_mels, chunk_length=int(seconds))
    tic = time.perf_counter()
    for p in paths:
        wav, _ = librosa.load(p, sr=16000)
        fe(wav, sampling_rate=16000, return_tensors="np")
    return len(paths) / (time.perf_counter() - tic)


def pipeline_clips_per_s(paths, n_mels: int, seconds: float, batch_size: int, batches: int,
                         workers: int, threads: int) -> float:
    from freezeempath_jax.data import pipeline

    records = [{"id": f"{i}", "audio": p} for i, p in enumerate(paths)]
    cfg = pipeline.PipelineConfig(batch_size=batch_size, n_mels=n_mels, seconds=seconds,
                                  shuffle=True, num_workers=workers, num_threads=threads,
                                  text_fields=())
    it = iter(pipeline.make_dataset(records, cfg, process_index=0, process_count=1))
    for _ in range(max(2, workers * 2)):  # warm-up: worker start-up, file cache
        next(it)
    tic = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += int(next(it)["valid"].sum())
    elapsed = time.perf_counter() - tic
    del it
    return n / elapsed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parents[1]
    p.add_argument("--audio-dir", default=str(here.parent / "shared" / "audio"))
    p.add_argument("--n-mels", type=int, default=128)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--workers", default="0,2")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    wavs = sorted(str(x) for x in Path(args.audio_dir).glob("*.wav"))
    if not wavs:
        sys.exit(f"no .wav files in {args.audio_dir}")
    n = args.batch_size * args.batches
    paths = [wavs[i % len(wavs)] for i in range(n)]
    ref = reference_clips_per_s(paths, args.n_mels, args.seconds)
    rows = [("transformers WhisperFeatureExtractor + librosa (1 process)", ref)]
    for w in (int(x) for x in args.workers.split(",")):
        rate = pipeline_clips_per_s(paths, args.n_mels, args.seconds, args.batch_size,
                                    args.batches, w, args.threads)
        rows.append((f"grain pipeline, {w} worker processes, {args.threads} threads", rate))
    print(f"Machine: {machine()}")
    print(f"{n} clips of {args.audio_dir} ({len(wavs)} files, resampled to 16 kHz), "
          f"{args.n_mels} mels, {args.seconds:g} s, batches of {args.batch_size}")
    print("| input path | clips/s | vs transformers |")
    print("|---|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} | {rate / ref:.2f} |")


if __name__ == "__main__":
    main()
