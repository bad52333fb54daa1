"""The training loop: `train(config, workdir)` runs one stage and returns its final metrics.

    config (configs/*.py) -> defaults.resolve (stage recipe) -> mesh + make_train_step
    -> parameters (random for tiny models, loaded via config.init for real ones)
    -> records (synthetic eSpeak corpus / manifests / noise / passed in) -> features
       (log-mel, optionally cached frozen-encoder outputs, self-distilled replies)
    -> batches.BatchBuilder -> jitted sharded step, evaluated every `eval_every` steps
    -> checkpoints every `ckpt_every` steps (and on SIGTERM), metrics to JSONL/TensorBoard.

A workdir that holds a checkpoint is resumed: the train state, the RNG and the data position
are restored, so the resumed run computes exactly what an uninterrupted run would have.

Command line (`launch/train.py`, and `freezeempath-jax train`, both via `train.cli`):

    freezeempath-jax train --config configs/tiny.py --config.stage=2a \\
        --config.train.steps=300 --workdir /tmp/run

JAX_COMPILATION_CACHE_DIR (a jax setting) keeps compiled steps between runs and restarts.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from freezeempath_jax import sharding
from freezeempath_jax.checkpoints.workdir import load_init_parts
from freezeempath_jax.models.configs import FreezeEmpathConfig, from_dict
from freezeempath_jax.text.prompts import PromptRecipe
from freezeempath_jax.text.tokenizers import make_tokenizer
from freezeempath_jax.train import batches as B_
from freezeempath_jax.train import checkpointing, defaults, flops
from freezeempath_jax.train import metrics as M_
from freezeempath_jax.train.features import FeatureMaker
from freezeempath_jax.train.records import (_encoder_frames, _mel_frames, load_records,
                                            num_speech_tokens, tokenizer_spec)
from freezeempath_jax.train.step import TrainStep, make_train_step, maybe_initialize_distributed
from freezeempath_jax.train import stream as stream_lib
from freezeempath_jax.train.stream import SKIPPED
from freezeempath_jax.train.targets import (ReplyDistiller, add_analyses, toy_attributes,
                                            toy_units, voice_genders)

log = logging.getLogger("freezeempath_jax.train")

# ---------------------------------------------------------------------------------------------
# Parameters


def initial_state(cfg, ts: TrainStep):
    """(state, frozen): random init (tiny models), or loaded parts from `config.init` (parts
    no checkpoint names are initialised randomly)."""
    loaded = load_init_parts(cfg.init, cfg.train.frozen_dtype)
    rng = jax.random.PRNGKey(int(cfg.train.seed))
    if not loaded:
        return ts.init(rng)
    return ts.from_params(loaded, rng)


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
        batch = next(self.source)
        self.skipped += int(batch[SKIPPED])
        return self.put(batch, local=True)


def _abstract_with_shardings(ts: TrainStep):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        ts.abstract_state, ts.state_shardings)


def _flops_per_step(cfg, ts: TrainStep, builder: B_.BatchBuilder) -> float:
    """Model FLOPs of one optimizer step over the global batch (`train.flops`)."""
    # tokens_per_row() - seq_len: the distill_kl teacher rows' width (0 otherwise).
    return float(flops.train_step_flops(
        ts.model_config, ts.train_config, seq_len=builder.seq_len,
        encoder_frames=builder.encoder_frames,
        teacher_seq_len=builder.tokens_per_row() - builder.seq_len or None,
        reply_len=builder.target_len, units_len=builder.units_len,
        encoder_cached=bool(cfg.data.cache_encoder),
        align_vocab=len(getattr(builder, "align_vocab", ())) or None))


def _evaluate(ts: TrainStep, state, frozen, data: _Data) -> Dict[str, float]:
    rows = [M_.to_host(ts.eval(state, frozen, b)) for b in data.eval]
    return M_.weighted_mean(rows, M_.EVAL_WEIGHTS)


def _preempted(flag: checkpointing.Preemption, step: int) -> bool:
    if jax.process_count() > 1:
        return bool(multihost_utils.reached_preemption_sync_point(step)) or flag.requested
    return flag.requested


def _resolved(config, workdir: str, train_records, eval_records):
    """(resolved config, raw train records, raw eval records): the stage recipe filled in
    from the number of training examples; only evaluated held-out records are kept."""
    defaults.canonical_stage(config.stage)  # fail fast on a bad stage name
    raw_train, raw_eval = load_records(config, workdir, train_records, eval_records)
    cfg = defaults.resolve(config, num_train_examples=len(raw_train))
    if cfg.train.eval_batches:  # only the held-out records that are evaluated get features
        raw_eval = raw_eval[:int(cfg.train.eval_batches) * int(cfg.train.batch_size)]
    return cfg, raw_train, raw_eval


def _train_step(cfg) -> TrainStep:
    """The mesh of `config.mesh` and the jitted sharded step of the stage."""
    model_cfg = from_dict(FreezeEmpathConfig, cfg.model)
    mesh = sharding.make_mesh(tuple(cfg.mesh.shape))
    rules = sharding.rules_from_config(cfg.mesh.rules)
    return make_train_step(model_cfg, defaults.train_config_from(cfg), mesh, rules)


def _prepare_data(cfg, ts: TrainStep, frozen, raw_train, raw_eval):
    """Records -> features and targets -> a batch builder and the data stream."""
    tic = time.perf_counter()
    model_cfg, stream = ts.model_config, use_stream(cfg)
    tok = make_tokenizer(model_cfg, tokenizer_spec(cfg))
    features = FeatureMaker(cfg, ts, frozen)
    train_recs = [dict(r) for r in raw_train] if stream else features.features(raw_train)
    eval_recs = features.features(raw_eval)
    everything = train_recs + eval_recs
    needs_replies = ts.train_config.resolved_objective not in ("align_ctc", "align_words",
                                                                "ser_ce")
    if model_cfg.emotion.num_genders:
        voice_genders(everything)
    dual = bool(cfg.data.get("dual_thinking", False)) and cfg.stage == "2b"
    if dual:  # before distillation: the teacher replies after each record's analysis
        add_analyses(everything, model_cfg.emotions)
    if cfg.stage in ("1", "3a", "3b", "2b") and needs_replies:
        ReplyDistiller(cfg, ts, frozen, tok).replies(everything,
                                                     with_emotion=cfg.stage == "2b")
    synthetic = cfg.data.kind in ("synthetic", "noise")
    if cfg.stage in ("3a", "3b") and synthetic:
        toy_units(everything, model_cfg.speech_decoder.unit_vocab_size, tok)
    if model_cfg.emotion.num_attributes and synthetic:
        toy_attributes(everything, model_cfg.emotion.num_attributes)
    frames = (_encoder_frames({"mel": np.zeros((1, _mel_frames(cfg.data.audio_seconds)))})
              if stream else _encoder_frames(train_recs[0]))
    builder = B_.BatchBuilder(
        model_cfg, cfg.stage, ts.train_config.resolved_objective, tok,
        num_speech_tokens(model_cfg, frames), chat_template=cfg.data.chat_template,
        target_len=int(cfg.data.target_len), teacher_len=int(cfg.data.teacher_len),
        units_len=int(cfg.data.units_len), recipe=PromptRecipe.from_config(cfg.data),
        dual_thinking=dual, unit_chunks=str(cfg.data.get("unit_chunks", "aligned")))
    builder.encoder_frames = frames
    builder.silence_text = str(cfg.data.get("align_silence", "\n"))
    if ts.train_config.resolved_objective in ("align_ctc", "align_words"):
        builder.set_align_vocab([r["transcript"] for r in everything if r.get("transcript")])
    if stream:
        builder.audio_shapes = {"mel": (model_cfg.whisper.n_mels,
                                        _mel_frames(cfg.data.audio_seconds))}
    data = _Data(cfg, ts, builder, train_recs, eval_recs, stream=stream)
    log.info("stage %s: %d train / %d eval records (%s), batches of %d x %d tokens, ready in "
             "%.1f s", cfg.stage, len(train_recs), len(eval_recs),
             "streamed through grain" if stream else "in memory", int(cfg.train.batch_size),
             builder.seq_len, time.perf_counter() - tic)
    return builder, data


def _resume(cfg, ckpt: checkpointing.Checkpointer, ts: TrainStep, state, data: "_Data"):
    """(state, start step): the newest intact checkpoint in the workdir restored (state, RNG
    and data position; a damaged newer one is skipped with a warning naming it), or the fresh
    state at step 0. `CheckpointIntegrityError` when no checkpoint there is intact."""
    start, restored, meta = ckpt.restore_newest(_abstract_with_shardings(ts), data.source)
    if start is None:
        return state, 0
    state = restored
    if meta.get("stage") not in (None, cfg.stage):
        raise ValueError(f"{ckpt.directory} holds a stage {meta['stage']} run; this config "
                         f"trains stage {cfg.stage}: use another workdir")
    log.info("resumed from step %d in %s", start, ckpt.directory)
    return state, start


class _Loop:
    """Steps `start + 1 .. train.steps`: evaluates every `eval_every`, checkpoints every
    `ckpt_every` (and on preemption), logs metrics one step behind so the host never waits
    on the device between steps."""

    def __init__(self, cfg, ts: TrainStep, frozen, data: "_Data", builder: B_.BatchBuilder,
                 ckpt: checkpointing.Checkpointer, workdir: str, start: int):
        self.cfg, self.ts, self.frozen, self.data, self.ckpt = cfg, ts, frozen, data, ckpt
        self.t = t = cfg.train
        self.start, self.total = start, int(t.steps)
        self.main_host = jax.process_index() == 0
        self.writer = M_.MetricsWriter(workdir, enabled=self.main_host,
                                       tensorboard=bool(t.tensorboard), resume_step=start)
        peak = t.peak_flops or M_.guess_peak_flops(jax.devices()[0].device_kind)
        self.thr = M_.Throughput(int(t.batch_size), builder.tokens_per_row() * int(t.batch_size),
                                 _flops_per_step(cfg, ts, builder), peak, jax.device_count())
        self.pending: List[tuple] = []  # (step, device metrics) not yet read back
        self.window: List[Dict[str, float]] = []
        self.last_train: Dict[str, float] = {}
        self.last_eval: Dict[str, float] = {}
        self.last_saved = start if start else None
        self.bar = None
        if self.main_host and t.progress:
            self.bar = tqdm(total=self.total, initial=start, desc=f"stage {cfg.stage}",
                            unit="step", dynamic_ncols=True)

    def drain(self, keep_last: bool):
        """Reads back metrics of finished steps, guards against NaN/inf and logs every
        log_every steps."""
        t = self.t
        while len(self.pending) > (1 if keep_last else 0):
            s, dev = self.pending.pop(0)
            host = M_.to_host(dev)
            if t.nan_guard:
                M_.check_finite(s, host, self.last_saved, self.ckpt.directory)
            self.window.append(host)
            if s % int(t.log_every) == 0 or s == self.total:
                avg = {k: float(np.mean([w[k] for w in self.window])) for k in self.window[0]}
                avg.update(self.thr.rates())
                if self.data.stream:
                    avg["skipped_records"] = float(self.data.skipped)
                self.writer.write(s, avg, "train")
                self.last_train = avg
                self.window.clear()
                if self.bar is not None:
                    self.bar.set_postfix({k: f"{avg[k]:.4g}" for k in
                                          ("loss", "ser_accuracy", "token_accuracy") if k in avg})

    def save(self, step: int, state):
        self.drain(keep_last=False)  # never save a state whose metrics were not checked
        meta = {"stage": self.cfg.stage, "step": step, "train": self.last_train,
                "eval": self.last_eval, "config": self.cfg.to_dict()}
        self.ckpt.save(step, state, self.data.source, meta)
        self.last_saved = step

    def run(self, state) -> Dict[str, Any]:
        t, ts, frozen, data = self.t, self.ts, self.frozen, self.data
        preempt = checkpointing.Preemption()
        preempted = False
        try:
            if self.start == 0 and t.eval_at_start and data.eval:
                self.writer.write(0, _evaluate(ts, state, frozen, data), "eval")
            self.thr.start()
            for step in range(self.start + 1, self.total + 1):
                state, m = ts.step(state, frozen, data.next())
                self.pending.append((step, m))
                self.thr.tick()
                self.drain(keep_last=True)
                if self.bar is not None:
                    self.bar.update(1)
                if step % int(t.eval_every) == 0 or step == self.total:
                    self.drain(keep_last=False)
                    self.last_eval = _evaluate(ts, state, frozen, data) if data.eval else {}
                    self.writer.write(step, self.last_eval, "eval")
                    self.thr.start()  # evaluation time is not training throughput
                if step % int(t.ckpt_every) == 0 or step == self.total:
                    self.save(step, state)
                if _preempted(preempt, step):
                    if self.last_saved != step:
                        self.save(step, state)
                    log.warning("%s received at step %d: checkpoint saved, exiting",
                                preempt.signal_name or "preemption", step)
                    preempted = True
                    break
            self.drain(keep_last=False)
        finally:
            self.ckpt.close()  # waits for in-flight saves: the last good checkpoint is complete
            self.writer.close()
            preempt.restore_handlers()
            if self.bar is not None:
                self.bar.close()
        out: Dict[str, Any] = {"step": int(jax.device_get(state.step)), "preempted": preempted}
        out.update({f"train/{k}": v for k, v in self.last_train.items()})
        out.update({f"eval/{k}": v for k, v in self.last_eval.items()})
        return out


def train(config, workdir: str, *, train_records: Optional[Sequence[Mapping]] = None,
          eval_records: Optional[Sequence[Mapping]] = None) -> Dict[str, Any]:
    """Trains the configured stage in `workdir` (resuming from its newest checkpoint).

    Returns the final metrics: {"step", "preempted", "train/<metric>" (mean over the last
    log window), "eval/<metric>" (last evaluation)}. Raises `metrics.NonFiniteError` when a
    metric turns NaN/inf (the bad state is not saved), `defaults.ConfigError` for a config
    that cannot train (before any work), `CheckpointIntegrityError` when the workdir holds
    checkpoints and none of them is intact.
    """
    defaults.validate(config, workdir)  # one-line ConfigError before any data or model work
    maybe_initialize_distributed()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    cfg, raw_train, raw_eval = _resolved(config, workdir, train_records, eval_records)
    ts = _train_step(cfg)
    tic = time.perf_counter()
    state, frozen = initial_state(cfg, ts)
    log.info("parameters ready in %.1f s", time.perf_counter() - tic)
    builder, data = _prepare_data(cfg, ts, frozen, raw_train, raw_eval)
    ckpt = checkpointing.Checkpointer(workdir, keep=int(cfg.train.keep),
                                      async_save=bool(cfg.train.async_ckpt))
    state, start = _resume(cfg, ckpt, ts, state, data)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1, default=str)
    return _Loop(cfg, ts, frozen, data, builder, ckpt, workdir, start).run(state)
