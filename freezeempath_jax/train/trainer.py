"""The training loop: `train(config, workdir)` runs one stage and returns its final metrics.

    config (configs/*.py) -> defaults.resolve (stage recipe) -> mesh + make_train_step
    -> parameters (random for tiny models, loaded via config.init for real ones)
    -> records (synthetic eSpeak corpus / manifests / noise / passed in) -> features
       (log-mel, optionally cached frozen-encoder outputs, self-distilled replies)
    -> batches.BatchBuilder -> jitted sharded step, evaluated every `eval_every` steps
    -> checkpoints every `ckpt_every` steps (and on SIGTERM), metrics to JSONL/TensorBoard.

A workdir that holds a checkpoint is resumed: the train state, the RNG and the data position
are restored, so the resumed run computes exactly what an uninterrupted run would have.

Command line (`launch/train.py`, and `freezeempath-jax train`, both via `main_train`):

    freezeempath-jax train --config configs/tiny.py --config.stage=2a \\
        --config.train.steps=300 --workdir /tmp/run

JAX_COMPILATION_CACHE_DIR (a jax setting) keeps compiled steps between runs and restarts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from freezeempath_jax import params as P_
from freezeempath_jax import sharding
from freezeempath_jax.models.configs import FreezeEmpathConfig, from_dict, to_dict
from freezeempath_jax.models.freezeempath import FreezeEmpath
from freezeempath_jax.train import batches as B_
from freezeempath_jax.train import checkpointing, defaults
from freezeempath_jax.train import metrics as M_
from freezeempath_jax.train.step import TrainStep, make_train_step, maybe_initialize_distributed

log = logging.getLogger("freezeempath_jax.train")

# Exit codes of the command line.
EXIT_OK, EXIT_NONFINITE, EXIT_ERROR = 0, 3, 1


def train_config_from(cfg) -> Dict[str, Any]:
    """The `train.step.TrainConfig` fields of a resolved config."""
    t, l = cfg.train, cfg.loss
    return dict(
        stage=cfg.stage, objective=l.objective,
        trainable_table=tuple(tuple(e) for e in cfg.trainable),
        frozen_dtype=t.frozen_dtype, compute_dtype=t.compute_dtype,
        remat_policy=t.remat_policy, steps=int(t.steps), batch_size=int(t.batch_size),
        microbatches=int(t.grad_accum), learning_rate=float(t.lr),
        warmup_fraction=float(t.warmup_frac), end_lr_fraction=float(t.end_lr_frac),
        weight_decay=float(t.weight_decay), b1=float(t.b1), b2=float(t.b2), eps=float(t.eps),
        grad_clip_norm=float(t.grad_clip) or None, ser_weight=float(l.ser_weight),
        attr_weight=float(l.attr_weight), kl_temperature=float(l.kl_temperature),
        kl_ce_weight=float(l.kl_ce_weight),
        sharding_overrides=(tuple(tuple(e) for e in cfg.mesh.overrides)
                            if cfg.mesh.get("overrides") else None),
        seed=int(t.seed))


# ---------------------------------------------------------------------------------------------
# Records


# Prototype (arousal, valence, dominance) per emotion in [-1, 1], for synthetic corpora.
EMOTION_AVD = {"angry": (0.8, -0.6, 0.6), "surprised": (0.7, 0.2, 0.0),
               "happy": (0.6, 0.8, 0.4), "sad": (-0.6, -0.7, -0.5), "neutral": (0.0, 0.0, 0.0)}

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
    from freezeempath_jax.data import synthetic
    from freezeempath_jax.data.manifests import read_manifest
    d = cfg.data
    out_dir = d.dir or os.path.join(workdir, "data")
    spec = {"num_per_emotion": int(d.num_per_emotion), "languages": list(d.languages),
            "seed": int(d.corpus_seed), "split_fractions": list(d.split_fractions)}
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
                                             progress=bool(cfg.train.progress))
            with open(marker, "w") as f:
                json.dump(spec, f)
        _sync_hosts("synthetic corpus")
    split = {s: read_manifest(os.path.join(out_dir, f"{s}.jsonl"))
             for s in ("train", "validation", "test")}
    return split["train"], split["validation"] + split["test"]


def _sync_hosts(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _read_manifest_lenient(path: str, unit_vocab: Optional[int], workdir: str,
                           split: str) -> List[dict]:
    """Manifest records; bad lines (malformed, missing audio, duplicate ids, units out of
    range) are skipped, counted in the log and in `<workdir>/skip_report_<split>.json`."""
    from freezeempath_jax.data.manifests import SkipReport, read_manifest
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


class RecordPreparer:
    """Adds what batches need to raw records: log-mel features (or cached frozen-encoder
    outputs), self-distilled replies, and toy units for synthetic stage-3 runs."""

    def __init__(self, cfg, ts: TrainStep, frozen, tokenizer):
        self.cfg, self.ts, self.frozen, self.tok = cfg, ts, frozen, tokenizer
        self.model_cfg: FreezeEmpathConfig = ts.model_config
        self._encode = None
        self.cache_dir = str(cfg.data.get("cache_dir", "") or "")

    def _cache_tag(self, *parts) -> str:
        """Short hash naming a cache entry by everything its content depends on."""
        blob = json.dumps([str(p) for p in parts], sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:16]

    def _encoder_cache_file(self, rec: Mapping) -> Optional[str]:
        """Where the frozen encoder's outputs for `rec` live on disk (None: no disk cache,
        or a record without a stable identity)."""
        if not self.cache_dir or not isinstance(rec.get("audio"), (str, os.PathLike)):
            return None
        source = self.cfg.init.whisper or self.cfg.init.freezeempath or f"seed{self.cfg.train.seed}"
        folder = "encoder-" + self._cache_tag(source, to_dict(self.model_cfg.whisper),
                                              self.cfg.data.audio_seconds)
        return os.path.join(self.cache_dir, folder,
                            self._cache_tag(os.path.abspath(rec["audio"]), rec.get("id")) + ".npz")

    def mel(self, rec: Mapping) -> np.ndarray:
        from freezeempath_jax.audio import load_audio, log_mel_spectrogram
        audio = rec["audio"]
        if isinstance(audio, (str, os.PathLike)):
            audio = load_audio(audio)
        secs = float(self.cfg.data.audio_seconds)
        return log_mel_spectrogram(np.asarray(audio, np.float32), self.model_cfg.whisper.n_mels,
                                   pad_or_trim_seconds=secs)

    def features(self, records: Sequence[Mapping]) -> List[dict]:
        out = []
        for rec in records:
            r = dict(rec)
            cached = (self._encoder_cache_file(r) if self.cfg.data.cache_encoder and
                      "encoder_last" not in r else None)
            if cached and os.path.exists(cached):
                with np.load(cached) as z:
                    r["encoder_last"], r["encoder_layers"] = z["last"], z["layers"]
            if "mel" not in r and "encoder_last" not in r:
                if "audio" not in r:
                    raise ValueError(f"record {r.get('id', '?')} has no audio, mel or "
                                     "encoder_last")
                r["mel"] = self.mel(r)
            out.append(r)
        if self.cfg.data.cache_encoder:
            self._cache_encoder([r for r in out if "encoder_last" not in r])
        return out

    def _cache_encoder(self, recs: List[dict], chunk: int = 16):
        """Runs the frozen encoder once per clip; training then reads its outputs."""
        if not recs:
            return
        if "whisper" not in self.frozen:
            raise ValueError("data.cache_encoder needs a frozen Whisper encoder, but the "
                             "trainable table trains part of it")
        if any(p.startswith("whisper/") for p in P_.flatten_with_paths(self.ts.abstract_state
                                                                     .params)):
            raise ValueError("data.cache_encoder: the encoder is (partly) trainable")
        if self._encode is None:
            model = self.ts.model

            def enc(whisper, mel):
                last, layers = model.apply({"params": {"whisper": whisper}}, mel,
                                           method=FreezeEmpath.encode_audio)
                return last.astype(jnp.float32), jnp.swapaxes(layers, 0, 1).astype(jnp.float32)
            self._encode = jax.jit(enc)
        whisper = self.frozen["whisper"]
        for i in range(0, len(recs), chunk):
            part = recs[i:i + chunk]
            mel = np.stack([r["mel"] for r in part])
            pad = chunk - len(part)
            if pad:  # one compiled shape
                mel = np.concatenate([mel, np.zeros((pad,) + mel.shape[1:], mel.dtype)])
            with jax.set_mesh(self.ts.mesh):
                last, layers = jax.device_get(self._encode(whisper, jnp.asarray(mel)))
            for j, r in enumerate(part):
                r["encoder_last"], r["encoder_layers"] = last[j], layers[j]
                del r["mel"]
                path = self._encoder_cache_file(r)
                if path and jax.process_index() == 0:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    tmp = path + ".tmp.npz"  # atomic: a killed run never leaves half a file
                    np.savez(tmp, last=last[j], layers=layers[j])
                    os.replace(tmp, path)

    def replies(self, records: List[dict], with_emotion: bool, batch: int = 32):
        """Self-distillation: the frozen LLM's own greedy reply to the transcript (plus the
        emotion label when `with_emotion`, stage 2b) for records that have none."""
        todo = [r for r in records if r.get("reply_ids") is None and not r.get("reply")]
        if not todo:
            return
        store = self._reply_store()
        keys = [json.dumps([r.get("transcript"), r.get("emotion") if with_emotion else None])
                for r in todo]
        first: Dict[str, dict] = {}  # one generation per distinct (transcript, emotion)
        for r, k in zip(todo, keys):
            if k not in store:
                first.setdefault(k, r)
        if first:
            self._generate_replies(list(first.values()), with_emotion, batch)
            store.update({k: r["reply_ids"] for k, r in first.items()})
            self._save_reply_store(store)
        for r, k in zip(todo, keys):
            r["reply_ids"] = list(store[k])

    def _reply_file(self) -> Optional[str]:
        if not self.cache_dir:
            return None
        d = self.cfg.data
        source = self.cfg.init.llm or self.cfg.init.freezeempath or f"seed{self.cfg.train.seed}"
        tag = self._cache_tag(source, d.chat_template, self.model_cfg.system_prompt,
                              d.target_len, d.teacher_len, d.tokenizer)
        return os.path.join(self.cache_dir, f"replies-{tag}.json")

    def _reply_store(self) -> Dict[str, list]:
        path = self._reply_file()
        if path and os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        return {}

    def _save_reply_store(self, store: Mapping[str, list]):
        path = self._reply_file()
        if path and jax.process_index() == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(store, f)
            os.replace(path + ".tmp", path)

    def _generate_replies(self, todo: List[dict], with_emotion: bool, batch: int):
        from freezeempath_jax import sampling
        d = self.cfg.data
        prompts = B_.PromptBuilder(self.tok, B_.ChatFormat.named(d.chat_template,
                                                                 self.model_cfg.system_prompt),
                                   0, 0)
        log.info("self-distilling %d replies with the frozen LLM", len(todo))
        llm = self.frozen["llm"]
        for i in range(0, len(todo), batch):
            part = todo[i:i + batch]
            rows = []
            for r in part:
                if not r.get("transcript"):
                    raise ValueError(f"record {r.get('id', '?')}: self-distillation needs a "
                                     "transcript")
                emo = r.get("emotion") if with_emotion else None
                rows.append(prompts.text_prompt(B_.teacher_content(r["transcript"], emo))
                            [: int(d.teacher_len)])
            width = max(len(x) for x in rows)
            ids = np.full((batch, width), self.tok.pad_id, np.int32)
            mask = np.zeros((batch, width), np.int32)
            rows += [rows[-1]] * (batch - len(rows))  # static batch: repeat the last prompt
            for j, x in enumerate(rows):  # left padding
                ids[j, width - len(x):] = x
                mask[j, width - len(x):] = 1
            with jax.set_mesh(self.ts.mesh):
                # An explicit mask: the pad id may equal a real token id (SmolLM2: pad = eos).
                out = sampling.generate_text(
                    self.model_cfg.llm, llm, ids, attention_mask=mask,
                    max_new_tokens=int(d.target_len) - 1,
                    eos_token_id=self.tok.eos_id, pad_token_id=self.tok.pad_id)
            for r, toks in zip(part, sampling.strip_after_eos(out, self.tok.eos_id)):
                r["reply_ids"] = [int(t) for t in toks if t != self.tok.pad_id]

    def toy_attributes(self, records: List[dict]):
        """Synthetic arousal / valence / dominance targets where a corpus has none: a fixed
        prototype point per emotion (RE-LLM option on synthetic data only)."""
        n = self.model_cfg.emotion.num_attributes
        for r in records:
            if r.get("attributes") is None and r.get("emotion") in EMOTION_AVD:
                r["attributes"] = list(EMOTION_AVD[r["emotion"]][:n])

    def toy_units(self, records: List[dict]):
        """Synthetic stage-3 targets where no unit extractor ran: two units per reply token
        (a fixed function of the token), so the speech decoder has a learnable mapping.
        Only for data.kind synthetic / noise; real runs read units from the manifest."""
        u = self.model_cfg.speech_decoder.unit_vocab_size
        for r in records:
            if r.get("units") is None:
                ids = r.get("reply_ids") or self.tok.encode(r.get("reply", ""))
                r["units"] = [(7 * t + k) % u for t in ids for k in (0, 3)]


# ---------------------------------------------------------------------------------------------
# Parameters


def initial_state(cfg, ts: TrainStep):
    """(state, frozen): random init (tiny models), or loaded parts from `config.init`."""
    i = cfg.init
    loaded: Dict[str, Any] = {}
    if i.freezeempath:
        from freezeempath_jax.checkpoints import load_freezeempath
        _, p = load_freezeempath(i.freezeempath, whisper=i.whisper or None,
                                 dtype=cfg.train.frozen_dtype)
        loaded.update(p)
    else:
        if i.whisper:
            from freezeempath_jax.checkpoints import load_whisper_encoder
            loaded["whisper"] = load_whisper_encoder(i.whisper, dtype=cfg.train.frozen_dtype)[1]
        if i.llm:
            from freezeempath_jax.checkpoints import load_causal_lm
            loaded["llm"] = load_causal_lm(i.llm, dtype=cfg.train.frozen_dtype)[1]
    for prev in i.previous or ():
        trained, meta = checkpointing.load_trained_params(prev)
        log.info("init: trained parts of stage %s from %s", meta.get("stage", "?"), prev)
        flat = P_.flatten_with_paths(loaded)
        flat.update(P_.flatten_with_paths(trained))
        loaded = P_.unflatten(flat)
    rng = jax.random.PRNGKey(int(cfg.train.seed))
    if not loaded:
        return ts.init(rng)
    return ts.from_params(loaded, rng)


def tokenizer_spec(cfg) -> str:
    """data.tokenizer, with "auto" meaning the tokenizer stored with init.freezeempath or
    init.llm (a Hugging Face directory or a .gguf file)."""
    spec = cfg.data.tokenizer
    if spec != "auto":
        return spec
    src = cfg.init.freezeempath or cfg.init.llm
    if not src:
        raise ValueError("data.tokenizer='auto' takes the tokenizer of init.llm or "
                         "init.freezeempath, but neither is set")
    return src


def num_speech_tokens(model: FreezeEmpathConfig, encoder_frames: int) -> int:
    """Speech placeholders for clips whose encoder output has `encoder_frames` frames."""
    w = dataclasses.replace(model.whisper, max_source_positions=int(encoder_frames))
    return dataclasses.replace(model, whisper=w).num_speech_tokens


def use_stream(cfg) -> bool:
    """Whether the run streams its training batches through grain (`data.stream`; None:
    for manifests only). Streaming makes features per batch, so it excludes the in-memory
    cache of frozen-encoder outputs."""
    d = cfg.data
    stream = d.kind == "manifest" if d.stream is None else bool(d.stream)
    if stream and d.kind not in ("manifest", "synthetic"):
        raise ValueError(f"data.stream needs records with audio files (data.kind manifest or "
                         f"synthetic), not data.kind={d.kind!r}")
    if stream and d.cache_encoder:
        raise ValueError("data.stream and data.cache_encoder exclude each other: the cache "
                         "holds every clip's encoder outputs in memory; set one of them False")
    return stream


def _mel_frames(seconds: float) -> int:
    """Log-mel frames of a clip padded or trimmed to `seconds` (hop 160 at 16 kHz)."""
    from freezeempath_jax import audio as audio_lib
    return int(round(float(seconds) * audio_lib.SAMPLING_RATE)) // audio_lib.HOP_LENGTH


def _encoder_frames(rec: Mapping) -> int:
    if "encoder_last" in rec:
        return int(np.shape(rec["encoder_last"])[0])
    return (int(np.shape(rec["mel"])[-1]) - 1) // 2 + 1  # conv2: kernel 3, stride 2, pad 1


# ---------------------------------------------------------------------------------------------
# The loop


class _Data:
    """Training stream + fixed eval batches, already placed on the devices.

    In memory (`batches.MemorySource`: records with their features, every host builds the
    global batch and keeps its rows) or streamed (`train.stream`: grain builds this host's
    rows from light records when they are needed). Either way `source` has `get_state()` /
    `set_state()`, which the checkpoints store.
    """

    def __init__(self, cfg, ts: TrainStep, builder: B_.BatchBuilder, train_recs, eval_recs,
                 stream: bool = False):
        self.ts, self.builder, self.stream = ts, builder, stream
        self.skipped = 0
        bs = int(cfg.train.batch_size)
        seed = int(cfg.data.shuffle_seed)
        mix = float(cfg.loss.mix_2a) if cfg.stage == "2b" else 0.0
        if stream:
            from freezeempath_jax.train import stream as stream_lib
            self.source = stream_lib.make_stream(
                train_recs, builder, batch_size=bs, n_mels=ts.model_config.whisper.n_mels,
                seconds=float(cfg.data.audio_seconds), seed=seed, mix_2a=mix,
                num_threads=int(cfg.data.num_threads), num_workers=int(cfg.data.num_workers),
                process_index=jax.process_index(), process_count=jax.process_count())
        elif cfg.stage == "2b":
            a = [dict(r, task="2a") for r in train_recs]
            b = [dict(r, task="2b") for r in train_recs]
            k = min(max(int(round(mix * bs)), 0), bs - 1)
            self.source = (B_.MixedSource(B_.MemorySource(a, k, seed),
                                          B_.MemorySource(b, bs - k, seed + 1))
                           if k else B_.MemorySource(b, bs, seed))
        else:
            self.source = B_.MemorySource(train_recs, bs, seed)
        if cfg.stage == "2b":
            eval_recs = [dict(r, task="2b") for r in eval_recs]
        self.eval = [self.put(builder(rows)) for rows in B_.eval_batches(eval_recs, bs)]

    def put(self, batch: Mapping[str, np.ndarray], local: bool = False):
        """A batch -> global arrays sharded over the batch axes. `batch` holds the global
        batch (each host keeps its rows), or with `local` only this host's rows."""
        pc, pi = jax.process_count(), jax.process_index()
        out = {}
        for k, v in batch.items():
            if k.startswith("_"):  # host-side bookkeeping
                continue
            if local:
                global_shape = (v.shape[0] * pc,) + v.shape[1:]
                out[k] = jax.make_array_from_process_local_data(self.ts.batch_sharding, v,
                                                                global_shape)
                continue
            rows = v if pc == 1 else np.asarray(B_.host_slice(v, pi, pc))
            out[k] = jax.make_array_from_process_local_data(self.ts.batch_sharding, rows,
                                                            v.shape)
        return out

    def next(self):
        if not self.stream:
            return self.put(self.builder(next(self.source)))
        from freezeempath_jax.train.stream import SKIPPED
        batch = next(self.source)
        self.skipped += int(batch[SKIPPED])
        return self.put(batch, local=True)


def _abstract_with_shardings(ts: TrainStep):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        ts.abstract_state, ts.state_shardings)


def _flops_per_step(cfg, ts: TrainStep, builder: B_.BatchBuilder) -> float:
    """Model FLOPs of one optimizer step over the global batch (`train.flops`)."""
    from freezeempath_jax.train import flops
    # tokens_per_row() - seq_len: the distill_kl teacher rows' width (0 otherwise).
    return float(flops.train_step_flops(
        ts.model_config, ts.train_config, seq_len=builder.seq_len,
        encoder_frames=builder.encoder_frames,
        teacher_seq_len=builder.tokens_per_row() - builder.seq_len or None,
        reply_len=builder.target_len, units_len=builder.units_len,
        encoder_cached=bool(cfg.data.cache_encoder)))


def _evaluate(ts: TrainStep, state, frozen, data: _Data) -> Dict[str, float]:
    rows = [M_.to_host(ts.eval(state, frozen, b)) for b in data.eval]
    return M_.weighted_mean(rows, M_.EVAL_WEIGHTS)


def _preempted(flag: checkpointing.Preemption, step: int) -> bool:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return bool(multihost_utils.reached_preemption_sync_point(step)) or flag.requested
    return flag.requested


def train(config, workdir: str, *, train_records: Optional[Sequence[Mapping]] = None,
          eval_records: Optional[Sequence[Mapping]] = None) -> Dict[str, Any]:
    """Trains the configured stage in `workdir` (resuming from its newest checkpoint).

    Returns the final metrics: {"step", "preempted", "train/<metric>" (mean over the last
    log window), "eval/<metric>" (last evaluation)}. Raises `metrics.NonFiniteError` when a
    metric turns NaN/inf (the bad state is not saved).
    """
    maybe_initialize_distributed()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    main_host = jax.process_index() == 0
    defaults.canonical_stage(config.stage)  # fail fast on a bad stage name
    raw_train, raw_eval = load_records(config, workdir, train_records, eval_records)
    cfg = defaults.resolve(config, num_train_examples=len(raw_train))
    stream = use_stream(cfg)
    if cfg.train.eval_batches:  # only the held-out records that are evaluated get features
        raw_eval = raw_eval[:int(cfg.train.eval_batches) * int(cfg.train.batch_size)]
    t = cfg.train
    model_cfg = from_dict(FreezeEmpathConfig, cfg.model)

    mesh = sharding.make_mesh(tuple(cfg.mesh.shape))
    rules = sharding.rules_from_config(cfg.mesh.rules)
    ts = make_train_step(model_cfg, train_config_from(cfg), mesh, rules)
    tic = time.perf_counter()
    state, frozen = initial_state(cfg, ts)
    log.info("parameters ready in %.1f s", time.perf_counter() - tic)
    tic = time.perf_counter()

    # Records -> features -> batches.
    tok = B_.make_tokenizer(model_cfg, tokenizer_spec(cfg))
    prep = RecordPreparer(cfg, ts, frozen, tok)
    train_recs = [dict(r) for r in raw_train] if stream else prep.features(raw_train)
    eval_recs = prep.features(raw_eval)
    if cfg.stage in ("1", "3a", "3b"):
        prep.replies(train_recs + eval_recs, with_emotion=False)
    elif cfg.stage == "2b":
        prep.replies(train_recs + eval_recs, with_emotion=True)
    synthetic = cfg.data.kind in ("synthetic", "noise")
    if cfg.stage in ("3a", "3b") and synthetic:
        prep.toy_units(train_recs + eval_recs)
    if model_cfg.emotion.num_attributes and synthetic:
        prep.toy_attributes(train_recs + eval_recs)
    frames = (_encoder_frames({"mel": np.zeros((1, _mel_frames(cfg.data.audio_seconds)))})
              if stream else _encoder_frames(train_recs[0]))
    builder = B_.BatchBuilder(
        model_cfg, cfg.stage, ts.train_config.resolved_objective, tok,
        num_speech_tokens(model_cfg, frames), chat_template=cfg.data.chat_template,
        target_len=int(cfg.data.target_len), teacher_len=int(cfg.data.teacher_len),
        units_len=int(cfg.data.units_len), stage1_template=cfg.data.stage1_template)
    builder.encoder_frames = frames
    if stream:
        builder.audio_shapes = {"mel": (model_cfg.whisper.n_mels,
                                        _mel_frames(cfg.data.audio_seconds))}
    data = _Data(cfg, ts, builder, train_recs, eval_recs, stream=stream)
    log.info("stage %s: %d train / %d eval records (%s), batches of %d x %d tokens, ready in "
             "%.1f s", cfg.stage, len(train_recs), len(eval_recs),
             "streamed through grain" if stream else "in memory", int(t.batch_size),
             builder.seq_len, time.perf_counter() - tic)

    # Resume.
    ckpt = checkpointing.Checkpointer(workdir, keep=int(t.keep), async_save=bool(t.async_ckpt))
    start = ckpt.latest_step()
    if start is not None:
        state, meta = ckpt.restore(start, _abstract_with_shardings(ts), data.source)
        if meta.get("stage") not in (None, cfg.stage):
            raise ValueError(f"{ckpt.directory} holds a stage {meta['stage']} run; this config "
                             f"trains stage {cfg.stage}: use another workdir")
        log.info("resumed from step %d in %s", start, ckpt.directory)
    start = start or 0
    if main_host:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1, default=str)

    total = int(t.steps)
    writer = M_.MetricsWriter(workdir, enabled=main_host, tensorboard=bool(t.tensorboard),
                              resume_step=start)
    peak = t.peak_flops or M_.guess_peak_flops(jax.devices()[0].device_kind)
    thr = M_.Throughput(int(t.batch_size), builder.tokens_per_row() * int(t.batch_size),
                        _flops_per_step(cfg, ts, builder), peak, jax.device_count())
    preempt = checkpointing.Preemption()
    bar = None
    if main_host and t.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=start, desc=f"stage {cfg.stage}", unit="step",
                   dynamic_ncols=True)

    pending: List[tuple] = []  # (step, device metrics) not yet read back
    window: List[Dict[str, float]] = []
    last_train: Dict[str, float] = {}
    last_eval: Dict[str, float] = {}
    last_saved = start if start else None

    def drain(keep_last: bool):
        """Reads back metrics of finished steps (one step behind, so the host never waits
        on the device between steps), guards against NaN/inf and logs every log_every."""
        nonlocal last_train
        while len(pending) > (1 if keep_last else 0):
            s, dev = pending.pop(0)
            host = M_.to_host(dev)
            if t.nan_guard:
                M_.check_finite(s, host, last_saved, ckpt.directory)
            window.append(host)
            if s % int(t.log_every) == 0 or s == total:
                avg = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                avg.update(thr.rates())
                if data.stream:
                    avg["skipped_records"] = float(data.skipped)
                writer.write(s, avg, "train")
                last_train = avg
                window.clear()
                if bar is not None:
                    bar.set_postfix({k: f"{avg[k]:.4g}" for k in
                                     ("loss", "ser_accuracy", "token_accuracy") if k in avg})

    def save(step: int):
        nonlocal last_saved
        drain(keep_last=False)  # never save a state whose metrics were not checked
        meta = {"stage": cfg.stage, "step": step, "train": last_train, "eval": last_eval,
                "config": cfg.to_dict()}
        ckpt.save(step, state, data.source, meta)
        last_saved = step

    preempted = False
    try:
        if start == 0 and t.eval_at_start and data.eval:
            writer.write(0, _evaluate(ts, state, frozen, data), "eval")
        thr.start()
        for step in range(start + 1, total + 1):
            batch = data.next()
            state, m = ts.step(state, frozen, batch)
            pending.append((step, m))
            thr.tick()
            drain(keep_last=True)
            if bar is not None:
                bar.update(1)
            if step % int(t.eval_every) == 0 or step == total:
                drain(keep_last=False)
                last_eval = _evaluate(ts, state, frozen, data) if data.eval else {}
                writer.write(step, last_eval, "eval")
                thr.start()  # evaluation time is not training throughput
            if step % int(t.ckpt_every) == 0 or step == total:
                save(step)
            if _preempted(preempt, step):
                if last_saved != step:
                    save(step)
                log.warning("%s received at step %d: checkpoint saved, exiting",
                            preempt.signal_name or "preemption", step)
                preempted = True
                break
        drain(keep_last=False)
    finally:
        ckpt.close()  # waits for in-flight saves: the last good checkpoint is complete
        writer.close()
        preempt.restore_handlers()
        if bar is not None:
            bar.close()
    final_step = int(jax.device_get(state.step))
    out: Dict[str, Any] = {"step": final_step, "preempted": preempted}
    out.update({f"train/{k}": v for k, v in last_train.items()})
    out.update({f"eval/{k}": v for k, v in last_eval.items()})
    return out


# ---------------------------------------------------------------------------------------------
# Command line


def define_flags():
    """`--config` (a config file, with `--config.a.b=value` overrides) and `--workdir`."""
    from absl import flags
    from ml_collections import config_flags
    if "config" not in flags.FLAGS:
        config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)",
                                        lock_config=False)
    if "workdir" not in flags.FLAGS:
        flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs); a directory "
                                             "holding a checkpoint is resumed")
    return flags.FLAGS


def run_from_flags(config, workdir) -> int:
    """Runs `train` and maps the outcome to an exit code (0 also after a preemption save)."""
    if config is None or not workdir:
        print("usage: train --config configs/<file>.py [--config.stage=2a "
              "--config.train.steps=N ...] --workdir DIR", file=sys.stderr)
        return 2
    try:
        result = train(config, workdir)
    except M_.NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    if jax.process_index() == 0:
        print(json.dumps(result, default=float))
    return EXIT_OK


def main_train(argv: Sequence[str]) -> int:
    """Entry point of `freezeempath-jax train` and `launch/train.py`: `argv[0]` is the
    program name, the rest absl flags (`--config FILE --config.x=y --workdir DIR`)."""
    from absl import logging as absl_logging
    flags_ = define_flags()
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(f"usage: {argv[0]} --config configs/<file>.py [--config.stage=2a "
              "--config.train.steps=N --config.<section>.<key>=VALUE ...] --workdir DIR\n\n"
              "Trains one stage; a DIR holding a checkpoint is resumed. Every field of the "
              "config file can be overridden; see configs/*.py and train/defaults.py.\n")
        print(flags_.module_help(__name__))
        return 0
    flags_(list(argv))
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes
    logging.basicConfig(level=logging.WARNING)
    log.setLevel(logging.INFO)
    return run_from_flags(flags_.config, flags_.workdir)
