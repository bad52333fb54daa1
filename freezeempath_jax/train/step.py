"""The sharded train and eval steps.

`make_train_step(model_config, train_config, mesh, rules)` returns a `TrainStep` holding:
- `init(rng) -> (state, frozen)`: random parameters created directly in their shardings;
- `from_params(params, rng) -> (state, frozen)`: loaded weights (a full or partial unboxed
  tree; missing leaves are initialised randomly, e.g. a fresh projector next to a loaded LLM);
- `step(state, frozen, batch) -> (state, metrics)`: one optimizer update, jitted once with
  explicit in/out shardings and the state donated;
- `eval(state, frozen, batch) -> metrics`;
- the shardings and abstract shapes of state / frozen, for checkpoint restore and AOT plans.

Inside the step the trainable subtree (fp32 master weights) is merged with the frozen subtree
(bf16 by default) and the model runs in its config's compute dtype; gradients are taken with
respect to the trainable subtree only, so the backward pass through the frozen LLM computes
activation gradients and no weight gradients. Gradient accumulation is a `lax.scan` over
microbatches that adds gradients of exactly normalised losses (see `losses`): the result
equals the full-batch gradient.

Batch keys (all with the batch on axis 0; see `losses` for the targets):
  audio: `mel` [B, n_mels, frames], or cached encoder outputs `encoder_last` [B, T, d] and
      `encoder_layers` [B, L, T, d] (batch-major; the model's [L, B, T, d] is made inside);
  prompt: `input_ids` [B, T] (placeholders expanded), `attention_mask` [B, T], `targets`,
      `loss_mask`, optionally `loss_positions` [B, R] (every position whose loss mask can be
      non-zero: the LM head then runs there only); stage 1 KL adds `teacher_input_ids`,
      `teacher_attention_mask`, `teacher_loss_mask` (and `teacher_loss_positions`); stages
      2a/2b add `emotion_label` [B] (-1 = none), optionally `attributes` [B, A] and
      `attr_mask` [B];
  stage 3: `reply_start` [B] (index of the first reply token in `input_ids`), `text_ids` [B, R]
      (reply tokens), `unit_ids` [B, U], and the streaming layout as `layout_kind`,
      `layout_index`, `layout_attention_mask`, `layout_loss_mask`, `layout_lengths`,
      `layout_chunk_end` (`layout_to_batch`); or `llm_hidden_prev` [B, R, H] precomputed instead of audio+prompt.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from freezeempath_jax import params as P_
from freezeempath_jax import sharding
from freezeempath_jax.checkpoints.model_tree import (abstract_boxed_params, init_boxed_params,
                                                     init_missing)
from freezeempath_jax.tree import cast_floating_abstract
from freezeempath_jax.models import streaming
from freezeempath_jax.models.configs import FreezeEmpathConfig, from_dict, to_dtype
from freezeempath_jax.models.freezeempath import FreezeEmpath
from freezeempath_jax.models.speech_decoder import noisy_units
from freezeempath_jax.train import losses
from freezeempath_jax.train import optimizer as opt_lib
from freezeempath_jax.train import state as state_lib
from freezeempath_jax.train.batches import reply_positions
from freezeempath_jax.train.state import TrainState

STAGE_OBJECTIVES, OBJECTIVES = losses.STAGE_OBJECTIVES, losses.OBJECTIVES


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What the step needs (config data; the loop adds its own keys beside these).

    stage: "1", "2a", "2b", "3a", "3b". objective: None = the stage's default
    (1: distill_ce, 2a/2b: emotion_ce, 3a/3b: unit_ce; "distill_kl" is the stage 1 variant,
    "ser_ce" a stage 2a warm-up of the SER head alone, without the LLM; "align_ctc" a stage 1
    warm-up of the projector by CTC against the transcript through the LLM's embedding table,
    without the LLM's layers; "align_words" the same warm-up from word timings, regressing
    each speech position onto the embedding of the token spoken there).
    trainable_table: [[regex, "trainable"|"frozen"], ...] or None for the stage's default.
    frozen_dtype: storage dtype of frozen parameters. compute_dtype / remat_policy: when set,
    override every component's dtype / remat policy in the model config.
    steps, warmup_fraction, ...: the optimizer schedule (`optimizer.make_optimizer`).
    batch_size: global batch (rows per step); microbatches: gradient-accumulation splits.
    sharding_overrides: [[regex, [mesh axis or null per dim]], ...] applied after the rules.
    """

    stage: str = "2a"
    objective: Optional[str] = None
    trainable_table: Optional[Tuple[Tuple[str, str], ...]] = None
    frozen_dtype: str = "bfloat16"
    compute_dtype: Optional[str] = None
    remat_policy: Optional[str] = None
    steps: int = 1000
    batch_size: int = 128
    microbatches: int = 1
    learning_rate: float = 2e-4
    warmup_fraction: float = 0.03
    end_lr_fraction: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip_norm: Optional[float] = 1.0
    no_decay_regex: str = P_.NO_DECAY_REGEX
    ser_weight: float = 0.8
    attr_weight: float = 0.0
    gender_weight: float = 0.0  # OSUM-EChat paralinguistic heads (need EmotionConfig heads)
    age_weight: float = 0.0
    kl_temperature: float = 1.0
    kl_ce_weight: float = 0.0
    # the emotion-word warm-up (`losses.with_emotion_words`): weight, and one token id per
    # emotion class in `model.emotions` order
    emotion_word_weight: float = 0.0
    emotion_word_ids: Tuple[int, ...] = ()
    # stage 3 (unit_ce): share of the decoder's input units replaced by random ones while it
    # predicts the clean units (`speech_decoder.noisy_units`); 0: plain teacher forcing
    unit_input_noise: float = 0.0
    sharding_overrides: Optional[Tuple[Tuple[str, Any], ...]] = None
    seed: int = 0

    @property
    def resolved_objective(self) -> str:
        obj = self.objective or STAGE_OBJECTIVES.get(str(self.stage))
        if obj not in OBJECTIVES:
            raise ValueError(f"TrainConfig: no objective for stage {self.stage!r} "
                             f"(objective={self.objective!r}); choose one of {OBJECTIVES}")
        return obj

    @property
    def table(self):
        return P_.stage_table(self.stage, self.trainable_table)

    @classmethod
    def from_dict(cls, d, allow_extra: bool = False) -> "TrainConfig":
        """From a mapping / ConfigDict. Unknown keys raise unless `allow_extra` (then they are
        left for the caller, e.g. the loop's own settings)."""
        if isinstance(d, TrainConfig):
            return d
        if hasattr(d, "to_dict"):
            d = d.to_dict()
        names = {f.name for f in dataclasses.fields(cls)}
        if allow_extra:
            d = {k: v for k, v in d.items() if k in names}
        d = dict(d)
        if d.get("emotion_word_ids") is not None:
            d["emotion_word_ids"] = tuple(int(t) for t in d["emotion_word_ids"])
        for key in ("trainable_table", "sharding_overrides"):
            if d.get(key) is not None:
                d[key] = tuple(tuple(e) for e in d[key])
        if "stage" in d:
            d["stage"] = str(d["stage"])
        return from_dict(cls, d)


def with_overrides(config: FreezeEmpathConfig, compute_dtype=None, remat_policy=None
                   ) -> FreezeEmpathConfig:
    """The model config with every component's compute dtype and/or remat policy replaced."""
    def lm(c):
        kw = {}
        if compute_dtype is not None:
            kw["dtype"] = compute_dtype
        if remat_policy is not None:
            kw["remat_policy"] = remat_policy
        return dataclasses.replace(c, **kw)

    kw = {"whisper": lm(config.whisper), "llm": lm(config.llm)}
    if compute_dtype is not None:
        kw["dtype"] = compute_dtype
    if config.speech_decoder is not None:
        kw["speech_decoder"] = dataclasses.replace(config.speech_decoder,
                                                   lm=lm(config.speech_decoder.lm))
    return dataclasses.replace(config, **kw)


def maybe_initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` when the environment describes a multi-process job
    (JAX_COORDINATOR_ADDRESS, a SLURM allocation of several tasks, a multi-host TPU slice,
    Open MPI); a no-op on a single machine. Returns whether it initialised.

    Under SLURM jax gives each process the GPU numbered SLURM_LOCALID unless
    JAX_LOCAL_DEVICE_IDS lists the node's GPUs (jax reads it): with one process per node, as
    launch/gpu_slurm.sh runs it, that variable must name all of them."""
    env = os.environ
    if env.get("FREEZEEMPATH_NO_DISTRIBUTED"):
        return False
    if jax.distributed.is_initialized() if hasattr(jax.distributed, "is_initialized") else False:
        return False
    kwargs = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
        if env.get("JAX_NUM_PROCESSES"):
            kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
        if env.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    elif int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
        pass  # jax's cluster detection reads the SLURM variables
    elif "TPU_WORKER_HOSTNAMES" in env and "," in env["TPU_WORKER_HOSTNAMES"]:
        pass  # multi-host TPU slice: detected from the TPU metadata
    elif int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        pass
    else:
        return False
    logging.info("jax.distributed.initialize(%s)", kwargs)
    jax.distributed.initialize(**kwargs)
    return True


def example_batch(model_config: FreezeEmpathConfig, objective: str, batch_size: int, *,
                  mel_frames: Optional[int] = None, reply_len: int = 8, prompt_len: int = 4,
                  unit_len: int = 12, seed: int = 0, abstract: bool = False
                  ) -> Dict[str, Any]:
    """A synthetic batch in the format `objective` reads (module docstring), for smoke runs,
    tests and AOT plans (`abstract=True` gives `jax.ShapeDtypeStruct`s, allocating nothing).

    Layout per row: `prompt_len` text tokens, the speech placeholders (as many as the adapter
    emits), the emotion placeholders (not for distill objectives), `prompt_len` more text
    tokens, then a reply of up to `reply_len` tokens; rows have different reply lengths and
    are right-padded. Token ids avoid the placeholder ids.
    """
    c = model_config
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    frames = mel_frames or 2 * c.whisper.max_source_positions
    t_enc = frames // 2
    if c.projector.type == "linear":
        n_speech = t_enc // c.projector.k
    else:
        from freezeempath_jax.models.adapters import conv_output_length
        n_speech = conv_output_length(t_enc, c.projector)
    n_emo = 0 if objective.startswith("distill") else c.emotion.num_tokens
    b, r = batch_size, reply_len
    t = 2 * prompt_len + n_speech + n_emo + r
    i32, f32 = np.int32, np.float32

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype)

    if abstract:
        out = {"mel": spec((b, c.whisper.n_mels, frames), f32), "input_ids": spec((b, t), i32),
               "attention_mask": spec((b, t), i32), "targets": spec((b, t), i32),
               "loss_mask": spec((b, t), f32), "loss_positions": spec((b, r), i32)}
        if objective == "distill_kl":
            tt = 2 * prompt_len + r
            out.update(teacher_input_ids=spec((b, tt), i32),
                       teacher_attention_mask=spec((b, tt), i32),
                       teacher_loss_mask=spec((b, tt), f32),
                       teacher_loss_positions=spec((b, r), i32))
        if objective == "align_ctc":
            out.update(transcript_ids=spec((b, r), i32), transcript_mask=spec((b, r), f32))
        if objective == "align_words":
            out.update(position_tokens=spec((b, n_speech), i32),
                       position_mask=spec((b, n_speech), f32))
        if objective in ("emotion_ce", "ser_ce"):
            out["emotion_label"] = spec((b,), i32)
            if c.emotion.num_attributes:
                out["attributes"] = spec((b, c.emotion.num_attributes), f32)
                out["attr_mask"] = spec((b,), f32)
            for name, _ in c.emotion.cue_heads:
                out[f"{name}_label"] = spec((b,), i32)
        if objective == "unit_ce":
            s_len = r + unit_len + 2
            out.update(reply_start=spec((b,), i32), text_ids=spec((b, r), i32),
                       unit_ids=spec((b, unit_len), i32),
                       **{f"layout_{k}": spec((b, s_len) if k != "lengths" else (b,),
                                              f32 if k == "loss_mask" else i32)
                          for k in streaming.LAYOUT_KEYS})
        return out

    rng = np.random.default_rng(seed)
    vocab = c.llm.vocab_size
    holders = {c.speech_token_id, c.emotion_token_id}

    def tokens(shape):
        x = rng.integers(5, vocab, shape)
        for h in holders:
            x = np.where(x == h, (h + 1 + np.arange(x.size).reshape(shape) % 7) % vocab, x)
        return x.astype(i32)

    reply_lens = np.array([max(1, r - (i % 3)) for i in range(b)])
    head = [tokens((b, prompt_len)), np.full((b, n_speech), c.speech_token_id, i32),
            np.full((b, n_emo), c.emotion_token_id, i32), tokens((b, prompt_len))]
    prompt = np.concatenate(head, axis=1)
    reply = tokens((b, r))
    valid_reply = np.arange(r)[None, :] < reply_lens[:, None]
    reply = np.where(valid_reply, reply, 0).astype(i32)
    ids = np.concatenate([prompt, reply], axis=1)
    attn = np.concatenate([np.ones_like(prompt), valid_reply.astype(i32)], axis=1)
    reply_mask = np.concatenate([np.zeros_like(prompt), valid_reply.astype(i32)], axis=1)
    targets, loss_mask = losses.next_token_targets(ids, reply_mask)
    out = {"mel": rng.normal(size=(b, c.whisper.n_mels, frames)).astype(f32),
           "input_ids": ids, "attention_mask": attn, "targets": np.asarray(targets),
           "loss_mask": np.asarray(loss_mask),
           "loss_positions": reply_positions(b, prompt.shape[1], r)}
    if objective == "distill_kl":
        tprompt = tokens((b, 2 * prompt_len))
        tids = np.concatenate([tprompt, reply], axis=1)
        tmask = np.concatenate([np.zeros_like(tprompt), valid_reply.astype(i32)], axis=1)
        out.update(teacher_input_ids=tids,
                   teacher_attention_mask=np.concatenate([np.ones_like(tprompt),
                                                          valid_reply.astype(i32)], axis=1),
                   teacher_loss_mask=np.asarray(losses.next_token_targets(tids, tmask)[1]),
                   teacher_loss_positions=reply_positions(b, tprompt.shape[1], r))
    if objective == "align_ctc":
        out.update(transcript_ids=reply, transcript_mask=valid_reply.astype(f32))
    if objective == "align_words":
        pos = tokens((b, n_speech))
        pos[:, ::3] = -1  # some positions where no word is spoken
        out.update(position_tokens=pos, position_mask=np.ones((b, n_speech), f32))
    if objective in ("emotion_ce", "ser_ce"):
        labels = rng.integers(0, c.emotion.num_classes, (b,)).astype(i32)
        labels[1::4] = -1  # some rows without an emotion label (stage 2b mixing)
        out["emotion_label"] = labels
        if c.emotion.num_attributes:
            out["attributes"] = rng.normal(size=(b, c.emotion.num_attributes)).astype(f32)
            out["attr_mask"] = np.ones((b,), f32)
        for name, classes in c.emotion.cue_heads:
            cue = rng.integers(0, classes, (b,)).astype(i32)
            cue[2::4] = -1  # some rows without this label (a corpus that lacks it)
            out[f"{name}_label"] = cue
    if objective == "unit_ce":
        sd = c.speech_decoder
        unit_lens = np.array([max(1, unit_len - 2 * (i % 3)) for i in range(b)])
        layout = streaming.build_layout(reply_lens, unit_lens, sd.stream_n, sd.stream_m,
                                        sd.max_length, seq_len=r + unit_len + 2)
        units = rng.integers(0, sd.unit_vocab_size, (b, unit_len)).astype(i32)
        out.update(reply_start=np.full((b,), prompt.shape[1], i32), text_ids=reply,
                   unit_ids=units, **streaming.layout_to_batch(layout))
    return out


# ---------------------------------------------------------------------------------------------
# Objectives: model passes feeding the pure losses.


def _encoder_states(batch):
    if "encoder_last" in batch:
        return (batch["encoder_last"], jnp.swapaxes(batch["encoder_layers"], 0, 1))
    return None


def _encoder_outputs(model, params, batch):
    """(last state, layer states) of the frozen encoder: cached in the batch, or computed."""
    enc = _encoder_states(batch)
    if enc is None:
        enc = model.apply({"params": params}, batch["mel"], method=FreezeEmpath.encode_audio)
    return enc


def _student(model, params, batch, return_logits=True):
    enc = _encoder_states(batch)
    return model.apply({"params": params}, mel=None if enc is not None else batch["mel"],
                       input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       encoder_states=enc, return_logits=return_logits)


def _at(x, positions):
    """x [B, T, ...] at positions [B, R] -> [B, R, ...]."""
    idx = positions.reshape(positions.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def _head_at(model, params, hidden, positions):
    """LLM logits at `positions` only: the [B, T, vocab] float32 logits of every prompt
    position (and their gradient) are the largest buffers of a step, and the prompt (300
    speech tokens for 30 s) carries no loss."""
    return model.apply({"params": params}, _at(hidden, positions),
                       method=FreezeEmpath.llm_logits)


def _student_windowed(model, params, batch):
    """(student output, batch) where, given `loss_positions` [B, R] (every position whose
    loss mask can be non-zero), logits, targets and loss mask are cut to those positions; the
    loss and its gradient are the same as over the whole row."""
    pos = batch.get("loss_positions")
    if pos is None:
        return _student(model, params, batch), batch
    out = _student(model, params, batch, return_logits=False)
    out = out.replace(logits=_head_at(model, params, out.hidden_states, pos))
    return out, dict(batch, targets=_at(batch["targets"], pos),
                     loss_mask=_at(batch["loss_mask"], pos))


def _decoder_logits(module: FreezeEmpath, h_prev, text_ids, unit_ids, layout,
                    input_unit_ids=None):
    dec = module.speech_decoder
    x, targets = dec.layout_inputs(h_prev, text_ids, unit_ids, layout, input_unit_ids)
    out = dec(x, attention_mask=jnp.asarray(layout.attention_mask))
    return out.logits, targets


def _reply_hidden(model, params, batch):
    """h_{t-1} for every reply token t: the frozen LLM's last hidden state at the position
    before it, from a forward pass over prompt + reply (no gradient: all of it is frozen)."""
    if "llm_hidden_prev" in batch:
        return batch["llm_hidden_prev"]
    out = _student(model, params, batch, return_logits=False)
    h = jax.lax.stop_gradient(out.hidden_states)
    r = batch["text_ids"].shape[1]
    pos = batch["reply_start"][:, None] - 1 + jnp.arange(r)[None, :]
    pos = jnp.clip(pos, 0, h.shape[1] - 1)
    return jnp.take_along_axis(h, pos[..., None], axis=1)


def objective_fn(model: FreezeEmpath, cfg: TrainConfig) -> Callable:
    """(params, batch, norm) -> (loss, sums) for the configured objective."""
    obj = cfg.resolved_objective
    cue_weights = {"gender": cfg.gender_weight, "age": cfg.age_weight}

    if obj == "distill_ce":
        def f(params, batch, norm):
            out, batch = _student_windowed(model, params, batch)
            return losses.distill_ce(out.logits, batch, norm)
    elif obj == "distill_kl":
        def f(params, batch, norm):
            out, batch = _student_windowed(model, params, batch)
            pos = batch.get("teacher_loss_positions")
            teacher = model.apply({"params": params}, input_ids=batch["teacher_input_ids"],
                                  attention_mask=batch.get("teacher_attention_mask"),
                                  return_logits=pos is None, method=FreezeEmpath.llm_forward)
            if pos is None:
                teacher_logits = teacher.logits
            else:
                teacher_logits = _head_at(model, params, teacher.hidden_states, pos)
                batch = dict(batch, teacher_loss_mask=_at(batch["teacher_loss_mask"], pos))
            return losses.distill_kl(out.logits, jax.lax.stop_gradient(teacher_logits), batch,
                                     norm, cfg.kl_temperature, cfg.kl_ce_weight)
    elif obj == "ser_ce":
        def f(params, batch, norm):
            enc = _encoder_outputs(model, params, batch)
            feats = model.apply({"params": params}, *enc,
                                method=FreezeEmpath.features_from_states)
            loss, sums = losses.ser_ce(feats.ser_logits, batch, feats.attributes, norm,
                                       attr_weight=cfg.attr_weight,
                                       cue_logits=feats.cue_logits, cue_weights=cue_weights)
            return losses.with_emotion_words(
                loss, sums, feats.emotion_embedding, params["llm"]["embed_tokens"]["embedding"],
                batch, norm, cfg.emotion_word_weight, cfg.emotion_word_ids)
    elif obj in ("align_ctc", "align_words"):  # the projector against the embedding table
        align_loss = losses.align_ctc if obj == "align_ctc" else losses.align_words

        def f(params, batch, norm):
            enc = _encoder_outputs(model, params, batch)
            speech = model.apply({"params": params}, enc[0], method=FreezeEmpath.project_speech)
            return align_loss(speech, params["llm"]["embed_tokens"]["embedding"], batch, norm)
    elif obj == "emotion_ce":
        def f(params, batch, norm):
            out, batch = _student_windowed(model, params, batch)
            loss, sums = losses.emotion_ce(out.logits, out.ser_logits, batch, out.attributes,
                                           norm, ser_weight=cfg.ser_weight,
                                           attr_weight=cfg.attr_weight,
                                           cue_logits=out.cue_logits, cue_weights=cue_weights)
            return losses.with_emotion_words(
                loss, sums, out.emotion_embedding, params["llm"]["embed_tokens"]["embedding"],
                batch, norm, cfg.emotion_word_weight, cfg.emotion_word_ids)
    else:  # unit_ce
        if model.config.speech_decoder is None:
            raise ValueError("objective unit_ce needs a model config with a speech_decoder")

        def f(params, batch, norm):
            layout = streaming.layout_from_batch(batch)
            h_prev = _reply_hidden(model, params, batch)
            logits, targets = model.apply({"params": params}, h_prev, batch["text_ids"],
                                          batch["unit_ids"], layout,
                                          batch.get("input_unit_ids"), method=_decoder_logits)
            return losses.unit_ce(logits, targets, layout.loss_mask, norm)
    return f


# ---------------------------------------------------------------------------------------------


def batch_axes(rules) -> Any:
    """Mesh axes the batch dimension is sharded over (the rule for "activation_batch")."""
    for name, axes in rules:
        if name == "activation_batch":
            return axes
    return None


def split_microbatches(batch, n: int, axes=None):
    """[B, ...] -> [n, B/n, ...] per leaf, microbatch i taking rows i, i+n, i+2n, ...: with the
    batch sharded in contiguous blocks every device keeps its share of each microbatch."""
    def one(x):
        b = x.shape[0]
        if b % n:
            raise ValueError(f"batch of {b} rows does not split into {n} microbatches")
        y = jnp.swapaxes(x.reshape((b // n, n) + x.shape[1:]), 0, 1)
        if axes is not None:
            y = jax.lax.with_sharding_constraint(y, P(None, axes))
        return y
    return jax.tree.map(one, batch)


class _Sharded:
    """A jitted function called under the mesh and the logical-axis rules (both are read at
    trace time by `nn.with_logical_constraint`)."""

    def __init__(self, fn, mesh: Mesh, rules):
        self.fn, self.mesh, self.rules = fn, mesh, rules

    def __call__(self, *args):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.fn(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.fn.lower(*args)


@dataclasses.dataclass
class TrainStep:
    """Everything built by `make_train_step` (see the module docstring)."""

    model: FreezeEmpath
    model_config: FreezeEmpathConfig
    train_config: TrainConfig
    mesh: Mesh
    rules: Any
    table: Any
    tx: optax.GradientTransformation
    schedule: Callable
    state_shardings: TrainState
    frozen_shardings: Any
    batch_sharding: NamedSharding
    abstract_state: TrainState
    abstract_frozen: Any
    init: Callable
    from_params: Callable
    step: _Sharded
    eval: _Sharded
    param_shardings: Any  # full (unboxed) tree


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Shapes and shardings of everything a step touches, all abstract (nothing allocated)."""

    labels: Any  # trainable / frozen label of every parameter
    full_abstract: Any  # unboxed ShapeDtypeStructs of the whole model
    full_shardings: Any
    train_shardings: Any
    frozen_shardings: Any
    state_shardings: TrainState
    abstract_state: TrainState
    abstract_frozen: Any
    batch_sharding: NamedSharding
    replicated: NamedSharding
    batch_axes: Any


def _plan(model_config: FreezeEmpathConfig, cfg: TrainConfig, tx, mesh: Mesh, rules) -> _Plan:
    """Splits the model's abstract tree by the stage's table and shards both halves, the
    optimizer state and the batch."""
    table = cfg.table
    boxed = abstract_boxed_params(model_config)
    full_abstract = nn.meta.unbox(boxed)
    labels = P_.label_tree(full_abstract, table)
    if P_.TRAINABLE not in set(jax.tree.leaves(labels)):
        raise ValueError(f"stage {cfg.stage!r}: the table {list(table)} marks no parameter "
                         "of this model trainable")
    full_sh = sharding.param_shardings(sharding.dedup_logical_names(boxed), mesh, rules)
    full_sh = P_.override_shardings(full_sh, cfg.sharding_overrides, mesh)
    train_sh, frozen_sh = P_.split(full_sh, labels)
    train_abs, frozen_abs = P_.split(full_abstract, labels)
    train_abs = cast_floating_abstract(train_abs, jnp.float32)
    frozen_abs = cast_floating_abstract(frozen_abs, cfg.frozen_dtype)
    opt_abs = jax.eval_shape(tx.init, train_abs)
    replicated = NamedSharding(mesh, P())
    state_sh = TrainState(step=replicated, params=train_sh,
                          opt_state=opt_lib.opt_state_shardings(opt_abs, train_sh, train_abs,
                                                                mesh),
                          rng=replicated)
    abstract_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=train_abs,
                                opt_state=opt_abs,
                                rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    b_axes = batch_axes(rules)
    return _Plan(labels=labels, full_abstract=full_abstract, full_shardings=full_sh,
                 train_shardings=train_sh, frozen_shardings=frozen_sh,
                 state_shardings=state_sh, abstract_state=abstract_state,
                 abstract_frozen=frozen_abs, batch_sharding=NamedSharding(mesh, P(b_axes)),
                 replicated=replicated, batch_axes=b_axes)


def _make_init(model_config, cfg: TrainConfig, tx, plan: _Plan, mesh: Mesh) -> Callable:
    """`init(rng=None) -> (state, frozen)`: random parameters created in their shardings."""
    def _init(rng):
        p_rng, s_rng = jax.random.split(rng)
        boxed_p = init_boxed_params(model_config, p_rng)
        trainable, frozen = state_lib.split_params(nn.meta.unbox(boxed_p), cfg.table,
                                                   cfg.frozen_dtype)
        return state_lib.create_state(trainable, tx, s_rng), frozen

    # Initialisation runs without logical rules: its forward pass is dead code and the output
    # shardings place every parameter (unboxing under rules would also constrain each one).
    init_jit = _Sharded(jax.jit(_init, out_shardings=(plan.state_shardings,
                                                      plan.frozen_shardings)), mesh, ())

    def init(rng=None):
        """Random parameters (seeded by `rng` or `TrainConfig.seed`), created sharded."""
        return init_jit(jax.random.PRNGKey(cfg.seed) if rng is None else rng)

    return init


def _make_from_params(model_config, cfg: TrainConfig, tx, plan: _Plan, mesh: Mesh,
                      rules) -> Callable:
    """`from_params(params, rng=None) -> (state, frozen)` for loaded weights."""
    def from_params(params, rng=None):
        """(state, frozen) from loaded weights: an unboxed tree with some or all parameters.

        Leaves absent from `params` are initialised randomly (only they are computed);
        unexpected paths and mis-shaped leaves raise, naming them.
        """
        if rng is None:
            rng = jax.random.PRNGKey(cfg.seed)
        given = P_.flatten_with_paths(nn.meta.unbox(params))
        want = P_.flatten_with_paths(plan.full_abstract)
        unexpected = sorted(set(given) - set(want))
        if unexpected:
            raise ValueError(f"from_params: unexpected parameters {unexpected[:10]}"
                             f"{' ...' if len(unexpected) > 10 else ''}")
        bad = [f"{p}: {tuple(np.shape(v))} vs {want[p].shape}" for p, v in given.items()
               if tuple(np.shape(v)) != tuple(want[p].shape)]
        if bad:
            raise ValueError(f"from_params: mis-shaped parameters {bad[:10]}")
        flat_labels = P_.flatten_with_paths(plan.labels)
        flat_sh = P_.flatten_with_paths(plan.full_shardings)
        p_rng, s_rng = jax.random.split(rng)
        with jax.set_mesh(mesh):
            fresh = init_missing(model_config, p_rng, [p for p in want if p not in given],
                                 flat_sh)

        def dtype_of(p, v):
            if not jnp.issubdtype(jnp.result_type(v), jnp.floating):
                return jnp.result_type(v)
            return jnp.float32 if flat_labels[p] == P_.TRAINABLE else to_dtype(cfg.frozen_dtype)

        placed = {p: jax.device_put(np.asarray(v).astype(dtype_of(p, v))
                                    if not isinstance(v, jax.Array)
                                    else v.astype(dtype_of(p, v)), flat_sh[p])
                  for p, v in given.items()}
        placed.update({p: v.astype(dtype_of(p, v)) for p, v in fresh.items()})
        trainable, frozen = P_.split(P_.unflatten({p: placed[p] for p in want}), plan.labels)
        make = jax.jit(lambda t, r: state_lib.create_state(t, tx, r),
                       out_shardings=plan.state_shardings)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            state = make(trainable, s_rng)
        return state, frozen

    return from_params


def _make_update(model: FreezeEmpath, cfg: TrainConfig, tx, schedule, plan: _Plan):
    """The pure `(state, frozen, batch) -> (state, metrics)` of one optimizer step (gradient
    accumulation over microbatches included) and the pure eval `-> metrics`."""
    objective = cfg.resolved_objective
    loss_of = objective_fn(model, cfg)
    n_micro = cfg.microbatches

    def _loss(trainable, frozen, batch, norm):
        return loss_of(P_.merge(trainable, frozen), batch, norm)

    grad_fn = jax.value_and_grad(_loss, has_aux=True)

    def _accumulated(state, frozen, batch, norm):
        micro = split_microbatches(batch, n_micro, plan.batch_axes)
        first = jax.tree.map(lambda x: x[0], micro)
        sums_abs = jax.eval_shape(lambda: _loss(state.params, frozen, first, norm)[1])
        zeros = (jax.lax.with_sharding_constraint(
            jax.tree.map(jnp.zeros_like, state.params), plan.train_shardings),
            jnp.zeros((), jnp.float32),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_abs))

        def body(carry, mb):
            g_acc, l_acc, s_acc = carry
            (l, s), g = grad_fn(state.params, frozen, mb, norm)
            return (jax.tree.map(jnp.add, g_acc, g), l_acc + l,
                    jax.tree.map(jnp.add, s_acc, s)), None

        (grads, loss, sums), _ = jax.lax.scan(body, zeros, micro)
        return (loss, sums), grads

    def update(state: TrainState, frozen, batch):
        norm = losses.normalizers(batch, objective)
        rng, step_key = jax.random.split(state.rng)
        if objective == "unit_ce" and cfg.unit_input_noise > 0:
            # drawn from the state's key: a resumed run reads the same noisy inputs
            batch = dict(batch, input_unit_ids=noisy_units(
                batch["unit_ids"], step_key, cfg.unit_input_noise,
                model.config.speech_decoder.unit_vocab_size))
        if n_micro == 1:
            (loss, sums), grads = grad_fn(state.params, frozen, batch, norm)
        else:
            (loss, sums), grads = _accumulated(state, frozen, batch, norm)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": grad_norm,
                   "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
                   **losses.finalize_metrics(sums)}
        new_state = state.replace(step=state.step + 1, params=new_params, opt_state=opt_state,
                                  rng=rng)
        return new_state, metrics

    def evaluate(state: TrainState, frozen, batch):
        norm = losses.normalizers(batch, objective)
        loss, sums = _loss(state.params, frozen, batch, norm)
        return {"loss": loss, **losses.finalize_metrics(sums)}

    return update, evaluate


def make_train_step(model_config: FreezeEmpathConfig, train_config, mesh: Mesh,
                    rules=sharding.DEFAULT_RULES) -> TrainStep:
    """Builds the model, optimizer, shardings and the jitted init / step / eval functions."""
    cfg = TrainConfig.from_dict(train_config)
    rules = sharding.rules_from_config(rules)
    model_config = with_overrides(model_config, cfg.compute_dtype, cfg.remat_policy)
    model = FreezeEmpath(model_config)
    cfg.resolved_objective  # fail fast on an unknown objective
    if cfg.microbatches < 1:
        raise ValueError(f"TrainConfig.microbatches must be >= 1, got {cfg.microbatches}")

    tx = opt_lib.make_optimizer(
        cfg.table, learning_rate=cfg.learning_rate, total_steps=cfg.steps,
        warmup_fraction=cfg.warmup_fraction, end_lr_fraction=cfg.end_lr_fraction,
        weight_decay=cfg.weight_decay, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
        grad_clip_norm=cfg.grad_clip_norm, no_decay_regex=cfg.no_decay_regex)
    schedule = opt_lib.make_schedule(cfg.learning_rate, cfg.steps, cfg.warmup_fraction,
                                     cfg.end_lr_fraction)
    plan = _plan(model_config, cfg, tx, mesh, rules)
    update, evaluate = _make_update(model, cfg, tx, schedule, plan)
    shardings = (plan.state_shardings, plan.frozen_shardings, plan.batch_sharding)
    step_jit = _Sharded(jax.jit(update, in_shardings=shardings,
                                out_shardings=(plan.state_shardings, plan.replicated),
                                donate_argnums=(0,)), mesh, rules)
    eval_jit = _Sharded(jax.jit(evaluate, in_shardings=shardings,
                                out_shardings=plan.replicated), mesh, rules)
    return TrainStep(model=model, model_config=model_config, train_config=cfg, mesh=mesh,
                     rules=rules, table=cfg.table, tx=tx, schedule=schedule,
                     state_shardings=plan.state_shardings,
                     frozen_shardings=plan.frozen_shardings,
                     batch_sharding=plan.batch_sharding, abstract_state=plan.abstract_state,
                     abstract_frozen=plan.abstract_frozen,
                     init=_make_init(model_config, cfg, tx, plan, mesh),
                     from_params=_make_from_params(model_config, cfg, tx, plan, mesh, rules),
                     step=step_jit, eval=eval_jit, param_shardings=plan.full_shardings)


def make_eval_step(model_config: FreezeEmpathConfig, train_config, mesh: Mesh,
                   rules=sharding.DEFAULT_RULES) -> Callable:
    """The jitted `(state, frozen, batch) -> metrics` of `make_train_step` on its own."""
    return make_train_step(model_config, train_config, mesh, rules).eval
