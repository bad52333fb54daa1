"""Default training ConfigDict sections that every file in `configs/` starts from, and the
resolution of stage-dependent fields.

Why resolution is lazy: ml_collections applies command-line overrides
(`--config.stage=1 --config.train.lr=3e-4`) *after* `get_config()` returns, so `get_config()`
cannot know the final stage. Stage-dependent fields are therefore `placeholder` values
(None with a declared type, so overrides still parse as numbers) and the per-stage defaults
live in the config itself as `config.recipes[stage]`. `resolve(config)`, called by the
trainer, fills every field still None from the recipe of the chosen stage and leaves every
field the user set alone:

    config.train.lr / batch_size / epochs / steps   <- recipes[stage]
    config.trainable                                <- recipes[stage].trainable, else the
                                                       freezing table of
                                                       `params.STAGE_TABLES[stage]`
    config.loss.objective                           <- recipes[stage].objective, else
                                                       the stage's (train.losses.STAGE_OBJECTIVES)
    config.train.eval_every                         <- train.ckpt_every

`steps` given in the recipe wins over `epochs`; otherwise steps = ceil(epochs x
data.num_train_examples / (batch_size)) once the data size is known (the trainer passes it).
"""

from __future__ import annotations

import copy
import math
import numbers
import os
from typing import Any, Dict, Mapping, Optional

import ml_collections
from ml_collections import config_dict

from freezeempath_jax import params as P_
from freezeempath_jax.checkpoints.workdir import init_path
from freezeempath_jax.models.configs import FreezeEmpathConfig, from_dict, to_dict, to_dtype
from freezeempath_jax.real_models import MissingModelError
from freezeempath_jax.sharding import DEFAULT_RULES
from freezeempath_jax.train.losses import OBJECTIVES, STAGE_OBJECTIVES

# Stage names the trainer knows; "3" is shorthand for "3a" (speech decoder on TTS units).
STAGES = ("1", "2a", "2b", "3a", "3b")
STAGE_ALIASES = {"3": "3a"}

# DESIGN.md section 5 recipe (paper). 3b's epoch count is not published: one epoch here.
PAPER_RECIPES = {
    "1": dict(lr=1e-3, batch_size=128, epochs=1.0),
    "2a": dict(lr=2e-4, batch_size=128, epochs=3.0),
    "2b": dict(lr=5e-6, batch_size=128, epochs=1.0),
    "3a": dict(lr=5e-4, batch_size=32, epochs=5.0),
    "3b": dict(lr=1e-5, batch_size=32, epochs=1.0),
}


def canonical_stage(stage: Any) -> str:
    """"1", "2a", "2b", "3a", "3b" (accepts ints and the "3" alias); ValueError otherwise."""
    s = str(stage).strip().lower()
    s = STAGE_ALIASES.get(s, s)
    if s not in STAGES:
        raise ValueError(f"config.stage={stage!r} is not a training stage; choose one of "
                         f"{list(STAGES)} (or '3' for '3a')")
    return s


def rules_as_lists(rules=DEFAULT_RULES) -> list:
    """Sharding rules as config data: [[logical_name, mesh_axis_or_list_or_None], ...]."""
    return [[name, list(axes) if isinstance(axes, tuple) else axes] for name, axes in rules]


def train_section() -> ml_collections.ConfigDict:
    """`config.train`: loop, optimizer, checkpoint and logging settings."""
    t = ml_collections.ConfigDict()
    # Stage-dependent (None until `resolve`): see the module docstring.
    t.steps = config_dict.placeholder(int)
    t.epochs = config_dict.placeholder(float)
    t.batch_size = config_dict.placeholder(int)  # global batch (all hosts, all micro-batches)
    t.lr = config_dict.placeholder(float)
    t.eval_every = config_dict.placeholder(int)
    t.warmup_frac = 0.03
    t.end_lr_frac = 0.0
    t.weight_decay = 0.0
    t.b1 = 0.9
    t.b2 = 0.999
    t.eps = 1e-8
    t.grad_clip = 1.0  # global-norm clip over trainable leaves; 0 disables
    t.grad_accum = 1  # micro-batches per optimizer step (batch_size must divide evenly)
    t.seed = 0
    t.frozen_dtype = "bfloat16"  # frozen parts (Whisper, LLM) are kept in this dtype
    t.compute_dtype = config_dict.placeholder(str)  # None: each model part's own dtype
    t.remat_policy = config_dict.placeholder(str)  # none | full | dots | dots_no_batch
    t.log_every = 10
    t.eval_batches = 4  # held-out batches per evaluation (0: all of the held-out set)
    t.eval_at_start = False  # also evaluate the untrained adapters (logged as step 0)
    t.ckpt_every = 100
    t.keep = 3  # checkpoints kept (keep-N)
    t.async_ckpt = True
    t.progress = True  # tqdm bar with ETA on the first host
    t.peak_flops = config_dict.placeholder(float)  # per device, for MFU; None: guess by kind
    t.nan_guard = True
    t.tensorboard = True
    return t


def mesh_section(shape=(-1, 1, 1)) -> ml_collections.ConfigDict:
    """`config.mesh`: sizes of (data, fsdp, tensor), one may be -1; logical-axis rules."""
    m = ml_collections.ConfigDict()
    m.shape = tuple(shape)
    m.rules = rules_as_lists()
    # [[regex over parameter paths, [mesh axis or None per dim]], ...] applied after the rules
    m.overrides = ()
    return m


def loss_section() -> ml_collections.ConfigDict:
    """`config.loss`: the objective (from the stage unless set) and its weights."""
    l = ml_collections.ConfigDict()
    # distill_ce | distill_kl | emotion_ce | unit_ce; None: the stage's own.
    l.objective = config_dict.placeholder(str)
    l.ser_weight = 0.8  # lambda of stages 2a/2b: CE + lambda x SER CE (the release uses 0)
    l.attr_weight = 0.0  # RE-LLM arousal/valence/dominance MSE (needs num_attributes > 0)
    # OSUM-EChat paralinguistic heads: + weight x CE of each (needs EmotionConfig.num_genders
    # / num_age_groups > 0 and records with `gender` / `age_group`)
    l.gender_weight = 0.0
    l.age_weight = 0.0
    l.kl_temperature = 1.0  # stage 1 KL variant
    l.kl_ce_weight = 0.0  # stage 1 KL variant: + this x CE on the teacher's reply
    l.mix_2a = 0.5  # stage 2b: share of each batch drawn from the 2a emotion task
    # objective ser_ce: + weight x squared error of the emotion embedding against the LLM's
    # embedding of a word per emotion (token ids in `model.emotions` order; the demo's)
    l.emotion_word_weight = 0.0
    l.emotion_word_ids = ()
    # stage 3 (unit_ce): share of the speech decoder's input units replaced by random units
    # while it predicts the clean ones, so it follows the text instead of continuing its own
    # units (`models.speech_decoder.noisy_units`); 0 is plain teacher forcing (the release's)
    l.unit_input_noise = 0.0
    return l


def data_section() -> ml_collections.ConfigDict:
    """`config.data`: where records come from and the static shapes batches are cut to.

    kind: "synthetic" (eSpeak emotional corpus built into `data.dir` on first use),
    "manifest" (JSONL files `train` / `eval`), or "memory" (records passed to `train()` by a
    caller, as tests do).
    """
    d = ml_collections.ConfigDict()
    d.kind = "synthetic"
    d.dir = ""  # corpus folder for kind=synthetic ("" -> <workdir>/data)
    d.train = ""  # manifest paths for kind=manifest
    d.eval = ""
    d.num_per_emotion = 24
    d.languages = ("en",)
    d.corpus_seed = 0
    # synthetic instructions: "fixed" (24 English questions) or "grammar" (400 training
    # questions of `data.synthetic.grammar_questions`, a quarter of the pairs held out)
    d.instructions = "fixed"
    d.split_fractions = (0.8, 0.1, 0.1)  # synthetic corpus: train / validation / test
    d.audio_seconds = 30.0  # clips are padded / trimmed to this (30 s for real Whisper)
    d.cache_encoder = False  # run the frozen encoder once per clip and train on its outputs
    # Streaming input (train/stream.py): records stay light and grain makes each batch's
    # log-mels when it is needed, in `num_threads` threads or `num_workers` processes. None:
    # on for manifests (too large to hold as features), off for the in-memory corpora.
    d.stream = config_dict.placeholder(bool)
    d.num_threads = 2
    d.num_workers = 0
    # Folder for work that depends only on frozen parts (encoder outputs, self-distilled
    # replies), reused by later stages and later runs ("" -> kept in memory for this run only).
    d.cache_dir = ""
    d.target_len = 16  # reply tokens (+ EOS), right-padded / cut
    d.teacher_len = 96  # stage 1 KL: teacher prompt tokens (transcript in the chat frame)
    # User-turn texts per stage (text.PromptRecipe; the chat turn is model.user_template):
    d.stage1_template = "<speech>"  # stage 1 user turn (the emotion part comes with stage 2)
    d.align_silence = "\n"  # align_words: the token a position without a word regresses to
    # stage 2a asks *about* the emotion (its 2b-mixed rows too); never the chat prompt
    d.emotion_template = "<speech><emotion> What emotion does the speaker's voice convey?"
    d.teacher_template = "{transcript}"  # what the teacher LLM reads instead of speech
    d.teacher_emotion_template = "{transcript} (with a {emotion} emotional tone)."  # 2b teacher
    d.teacher_neutral_plain = False  # True: neutral clips get the plain teacher text
    # OSUM-EChat dual thinking (stage 2b, and chat's default): the assistant turn opens with
    # a paralinguistic analysis ("(The user sounds like a woman, and sad.)", from the labels
    # in training, from the heads' predictions in chat) and the reply follows it
    d.dual_thinking = False
    d.units_len = 64  # stage 3: unit tokens per example
    # stage 3's streaming layout: "aligned" (each text chunk followed by its own speech, from
    # the records' `token_unit_ends`; records without them fall back to fixed chunks) or
    # "fixed" (the release's M units per chunk). See models/streaming.py.
    d.unit_chunks = "aligned"
    # chat's default speech-unit sampling temperature for a checkpoint trained with this
    # config (`chat --unit-temperature` overrides it); the release samples units at 1.0
    d.unit_temperature = 1.0
    d.tokenizer = "byte"  # "byte" (random tiny models) or a tokenizer directory / gguf file
    d.chat_template = "plain"  # "plain" (tiny byte-level) or "qwen" / "hf" (real tokenizers)
    d.shuffle_seed = 0
    d.num_train_examples = config_dict.placeholder(int)  # filled from the data when known
    return d


def init_section() -> ml_collections.ConfigDict:
    """`config.init`: where parameters come from. Empty paths mean random init (tiny models).

    whisper / llm / freezeempath: checkpoint paths for the loaders of `checkpoints`;
    previous: workdirs of earlier stages whose trained parts are merged in (stage 2 starts
    from stage 1's projector).
    """
    i = ml_collections.ConfigDict()
    i.whisper = ""
    i.llm = ""
    i.freezeempath = ""
    i.previous = ()
    return i


def base_config(model, recipes: Mapping[str, Mapping[str, Any]], stage: str = "2a"
                ) -> ml_collections.ConfigDict:
    """A full training config around `model` (a FreezeEmpathConfig preset) with per-stage
    `recipes` ({stage: {lr, batch_size, epochs | steps, trainable?, loss?}})."""
    for name in recipes:
        canonical_stage(name)
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.model = to_dict(model)
    c.recipes = {k: dict(v) for k, v in recipes.items()}
    c.train = train_section()
    c.mesh = mesh_section()
    c.trainable = config_dict.placeholder(tuple)  # ((regex, "trainable"|"frozen"), ...)
    c.loss = loss_section()
    c.data = data_section()
    c.init = init_section()
    return c


def resolve(config: ml_collections.ConfigDict, num_train_examples: Optional[int] = None
            ) -> ml_collections.ConfigDict:
    """A copy of `config` with the stage canonicalised and every stage-dependent None field
    filled from `config.recipes[stage]` (see the module docstring). Explicit values win."""
    c = copy.deepcopy(config)
    with c.unlocked():
        c.stage = canonical_stage(c.stage)
        recipes = c.recipes.to_dict() if hasattr(c.recipes, "to_dict") else dict(c.recipes)
        recipe = recipes.get(c.stage)
        if recipe is None:
            raise ValueError(f"config has no recipe for stage {c.stage!r} (config.recipes has "
                             f"{sorted(recipes)})")
        known = {"lr", "batch_size", "epochs", "steps", "trainable", "objective", "eval_every"}
        unknown = sorted(set(recipe) - known)
        if unknown:
            raise ValueError(f"config.recipes[{c.stage!r}] has unknown keys {unknown}; "
                             f"known: {sorted(known)}")
        t = c.train
        for key in ("lr", "batch_size", "epochs", "steps"):
            if t[key] is None and recipe.get(key) is not None:
                t[key] = recipe[key]
        if t.lr is None or t.batch_size is None:
            raise ValueError(f"stage {c.stage}: train.lr and train.batch_size must be set "
                             "(in the recipe or on the command line)")
        if num_train_examples is not None and c.data.num_train_examples is None:
            c.data.num_train_examples = int(num_train_examples)
        if t.steps is None:
            if t.epochs is None or c.data.num_train_examples is None:
                raise ValueError(f"stage {c.stage}: set train.steps, or train.epochs with a "
                                 "known number of training examples")
            t.steps = max(1, int(math.ceil(t.epochs * c.data.num_train_examples
                                           / t.batch_size)))
        if t.eval_every is None:
            t.eval_every = recipe.get("eval_every") or t.ckpt_every
        if c.loss.objective is None:
            c.loss.objective = recipe.get("objective") or STAGE_OBJECTIVES[c.stage]
        if c.trainable is None:
            table = recipe.get("trainable")
            c.trainable = tuple(tuple(e) for e in (table or P_.stage_table(c.stage)))
        else:
            c.trainable = P_.normalize_table(c.trainable)
        if t.batch_size % t.grad_accum:
            raise ValueError(f"train.batch_size={t.batch_size} is not divisible by "
                             f"train.grad_accum={t.grad_accum}")
    return c


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
        attr_weight=float(l.attr_weight), gender_weight=float(l.get("gender_weight", 0.0)),
        age_weight=float(l.get("age_weight", 0.0)), kl_temperature=float(l.kl_temperature),
        kl_ce_weight=float(l.kl_ce_weight),
        emotion_word_weight=float(l.get("emotion_word_weight", 0.0)),
        emotion_word_ids=tuple(int(t) for t in l.get("emotion_word_ids", ()) or ()),
        unit_input_noise=float(l.get("unit_input_noise", 0.0)),
        sharding_overrides=(tuple(tuple(e) for e in cfg.mesh.overrides)
                            if cfg.mesh.get("overrides") else None),
        seed=int(t.seed))


# ---------------------------------------------------------------------------------------------
# Validation before any work


class ConfigError(ValueError):
    """A training config that cannot run; the message is one line naming the field."""


DATA_KINDS = ("synthetic", "manifest", "noise", "memory")
# (section, key, lowest allowed value) of numeric fields; None values are left to `resolve`.
_AT_LEAST = (
    ("train", "steps", 1), ("train", "batch_size", 1), ("train", "grad_accum", 1),
    ("train", "eval_every", 1), ("train", "ckpt_every", 1), ("train", "log_every", 1),
    ("train", "keep", 1), ("train", "eval_batches", 0), ("data", "target_len", 1),
    ("data", "teacher_len", 1), ("data", "units_len", 1), ("data", "num_threads", 0),
    ("data", "num_workers", 0),
)
_POSITIVE = (("train", "epochs"), ("train", "lr"), ("data", "audio_seconds"))
_FRACTIONS = (("train", "warmup_frac"), ("train", "end_lr_frac"), ("loss", "mix_2a"))


def _field(config, section: str, key: str):
    node = config.get(section) if hasattr(config, "get") else None
    return None if node is None or not hasattr(node, "get") else node.get(key)


def validate(config, workdir: Optional[str] = None) -> None:
    """Raises `ConfigError` (one line, naming the field) for a config that could not train:
    an unknown stage or data kind or objective or dtype, a missing recipe, a count below
    its minimum (steps 0, batch size 0, ...), a non-positive or non-finite learning rate /
    epoch count / clip length, a fraction outside [0, 1], a model section that does not
    build, a frozen part `init` names that cannot be found, or a `workdir` that is a file.
    Cheap: run before any data or model work."""
    try:
        stage = canonical_stage(config.stage)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    recipes = config.get("recipes") or {}
    if stage not in recipes:
        raise ConfigError(f"config.recipes has no recipe for stage {stage!r} (it has "
                          f"{sorted(recipes)})")
    for section, key, low in _AT_LEAST:
        v = _field(config, section, key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)
                              or v < low):
            raise ConfigError(f"config.{section}.{key}={v!r} must be an integer >= {low}")
    for section, key in _POSITIVE:
        v = _field(config, section, key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)
                              or not math.isfinite(v) or v <= 0):
            raise ConfigError(f"config.{section}.{key}={v!r} must be a number > 0")
    for section, key in _FRACTIONS:
        v = _field(config, section, key)
        if v is not None and (not isinstance(v, numbers.Real) or not 0.0 <= v <= 1.0):
            raise ConfigError(f"config.{section}.{key}={v!r} must be a fraction in [0, 1]")
    noise = _field(config, "loss", "unit_input_noise")
    if noise is not None and (isinstance(noise, bool) or not isinstance(noise, numbers.Real)
                              or not 0.0 <= noise < 1.0):
        raise ConfigError(f"config.loss.unit_input_noise={noise!r} must be in [0, 1) (the "
                          "share of input units replaced)")
    kind = _field(config, "data", "kind")
    if kind not in DATA_KINDS:
        raise ConfigError(f"config.data.kind={kind!r} is unknown; choose one of "
                          f"{list(DATA_KINDS)}")
    objective = _field(config, "loss", "objective")
    if objective is not None and objective not in OBJECTIVES:
        raise ConfigError(f"config.loss.objective={objective!r} is unknown; choose one of "
                          f"{list(OBJECTIVES)}")
    for key in ("frozen_dtype", "compute_dtype"):
        v = _field(config, "train", key)
        if v is not None:
            try:
                to_dtype(v)
            except (TypeError, ValueError):
                raise ConfigError(f"config.train.{key}={v!r} is not a dtype name (float32, "
                                  "bfloat16, float16)") from None
    try:
        from_dict(FreezeEmpathConfig, config.model)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ConfigError(f"config.model does not build a FreezeEmpathConfig: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    try:  # recipe keys, lr / batch size set, batch divisible by grad_accum
        resolve(config, num_train_examples=config.data.get("num_train_examples") or 1)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    init = config.get("init")
    if init is not None:  # a missing frozen part fails now, not after the corpus is built
        keys = ("freezeempath", "whisper") if init.get("freezeempath") else ("whisper", "llm")
        for key in keys:
            try:
                init_path(init, key)
            except (MissingModelError, ValueError) as e:
                raise ConfigError(str(e)) from None
    if workdir is not None and os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"workdir {workdir!r} is a file, not a folder")
