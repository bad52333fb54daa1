"""Spoken chat with a FreezeEmpath model: one turn is audio in -> emotion (SER head), reply
text and speech units; conversations keep earlier turns; `run_chat` is the library side of
`freezeempath-jax chat`.

A turn, batched over B conversations:

    audio -> log-mel -> FreezeEmpath.encode_speech -> speech embeds [S, H], emotion embed
    [Q, H], SER logits -> label + probabilities
    prompt ids (chat frame; the user turn `config.user_template` with S speech and Q emotion
    placeholder ids; earlier turns before it) -> FreezeEmpath.prompt_embeds (splice)
    -> speech_generation.generate_speech (text + units, when the model has a speech decoder)
       or sampling.generate_from_embeds (text only)

Earlier turns are kept (`history`): "embeddings" re-splices each earlier turn's speech and
emotion embeddings (the model hears them again), "text" replaces them with the transcript
given for that turn (or "(speech)") and its predicted emotion label, as the stage-2b teacher
prompt writes it. The assistant's earlier replies are kept as the ids it generated. Turns
are dropped oldest first, with a warning, when the prompt plus `max_new_tokens` would exceed
the context limit.

Prompt text follows the training frame (`train.batches.ChatFormat`, "plain" or "qwen"), so a
first turn is token for token the prompt the model was trained on.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from freezeempath_jax import sampling as sampling_lib
from freezeempath_jax.models.configs import FreezeEmpathConfig, from_dict, to_dtype
from freezeempath_jax.models.freezeempath import FreezeEmpath, SpeechFeatures

log = logging.getLogger(__name__)

SPEECH = "<speech>"
EMOTION = "<emotion>"
MAX_SECONDS = 30.0  # the encoder hears 30 s; longer input would be cut silently


# ---------------------------------------------------------------------------------------------
# Prompt frame and tokenizer adapter


@dataclasses.dataclass(frozen=True)
class TurnFormat:
    """Text around turns. The first user turn is `first_prefix + content + suffix` (exactly
    `train.batches.ChatFormat`); a reply is followed by `turn_end`, and later user turns
    start with `user_prefix`."""

    first_prefix: str
    user_prefix: str
    suffix: str
    turn_end: str
    use_bos: bool

    @staticmethod
    def named(name: str, system_prompt: str) -> "TurnFormat":
        from freezeempath_jax.train.batches import ChatFormat

        f = ChatFormat.named(name, system_prompt)
        if name == "plain":
            return TurnFormat(f.prefix, "user: ", f.suffix, "\n", f.use_bos)
        # "qwen" / "chatml"
        return TurnFormat(f.prefix, "<|im_start|>user\n", f.suffix, "<|im_end|>\n", f.use_bos)


class Codec:
    """What chat needs of a tokenizer: encode / decode, bos, pad and every EOS id.

    Accepts `train.batches.ByteTokenizer` / `HFTokenizer` or a bare transformers tokenizer.
    Chat models end a reply with an end-of-turn token that may differ from the tokenizer's
    EOS (`<|im_end|>` vs `<|endoftext|>`): both stop generation.
    """

    END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>")

    def __init__(self, tokenizer):
        hf = getattr(tokenizer, "tok", None)
        if hf is None and hasattr(tokenizer, "convert_tokens_to_ids"):
            hf = tokenizer  # a bare transformers tokenizer
            self.encode = lambda text: list(hf.encode(text, add_special_tokens=False))
            self.decode = lambda ids: hf.decode(list(ids), skip_special_tokens=True)
            eos = hf.eos_token_id
            self.pad_id = hf.pad_token_id if hf.pad_token_id is not None else eos
            self.bos_id = hf.bos_token_id
        else:
            self.encode, self.decode = tokenizer.encode, tokenizer.decode
            eos, self.pad_id = tokenizer.eos_id, tokenizer.pad_id
            self.bos_id = getattr(tokenizer, "bos_id", None)
        ids = [] if eos is None else [int(eos)]
        if hf is not None:
            vocab = hf.get_vocab()
            ids += [int(vocab[t]) for t in self.END_TOKENS if t in vocab]
        if not ids:
            raise ValueError("the tokenizer defines no EOS token; chat cannot stop replies")
        self.eos_ids = tuple(dict.fromkeys(ids))
        if self.pad_id is None:
            self.pad_id = self.eos_ids[0]


# ---------------------------------------------------------------------------------------------
# Conversations


@dataclasses.dataclass
class Turn:
    """One finished exchange, as kept in a conversation."""

    reply_ids: List[int]
    reply: str
    emotion: str
    transcript: Optional[str] = None
    speech_embeds: Optional[np.ndarray] = None  # [S, H] (history="embeddings")
    emotion_embedding: Optional[np.ndarray] = None  # [Q, H]


@dataclasses.dataclass
class Conversation:
    """Earlier turns of one dialogue (oldest first)."""

    turns: List[Turn] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Reply:
    """What one turn produced for one conversation."""

    text: str
    text_ids: List[int]
    units: Optional[List[int]]  # raw unit values; None without a speech decoder
    emotion: str
    probabilities: Dict[str, float]
    dropped_turns: int = 0  # earlier turns dropped to fit the context


def _bucket(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class ChatModel:
    """A FreezeEmpath model ready to answer spoken turns.

    config / params: the composite model (params tree with whisper, projector, emotion, llm
    and optionally speech_decoder). tokenizer: see `Codec`. chat_template: "plain" | "qwen" |
    "chatml" (as `train.batches.ChatFormat`).
    audio_seconds: clips are padded / cut to this (30 s for real Whisper; the length the model
    was trained with). history: "embeddings" | "text" (see the module docstring).
    max_context: prompt + reply limit (default the LLM's max_position_embeddings).
    """

    def __init__(self, config: FreezeEmpathConfig, params, tokenizer, *,
                 chat_template: str = "qwen", audio_seconds: float = MAX_SECONDS,
                 history: str = "embeddings", max_context: Optional[int] = None,
                 max_units: Optional[int] = None, prompt_bucket: int = 32):
        if history not in ("embeddings", "text"):
            raise ValueError(f"history must be 'embeddings' or 'text', got {history!r}")
        frames = int(round(audio_seconds * 100))  # 10 ms hop
        if frames < 2 * config.whisper.max_source_positions and not \
                config.whisper.allow_short_inputs:
            # The model was trained on clips shorter than 30 s; the encoder must accept them.
            config = dataclasses.replace(config, whisper=dataclasses.replace(
                config.whisper, allow_short_inputs=True))
        self.config, self.params = config, params
        self.codec = tokenizer if isinstance(tokenizer, Codec) else Codec(tokenizer)
        self.fmt = TurnFormat.named(chat_template, config.system_prompt)
        self.audio_seconds = float(audio_seconds)
        self.history = history
        self.max_context = int(max_context or config.llm.max_position_embeddings)
        self.max_units = max_units
        self.prompt_bucket = int(prompt_bucket)
        model = FreezeEmpath(config)
        self._encode = jax.jit(lambda p, mel: model.apply(
            {"params": p}, mel, method=FreezeEmpath.encode_speech))
        self._embed = jax.jit(lambda p, ids, speech, emo: model.apply(
            {"params": p}, ids, SpeechFeatures(speech, emo, None),
            method=FreezeEmpath.prompt_embeds))

    # -- features

    def mel(self, audio) -> np.ndarray:
        """[n_mels, frames] features of a 16 kHz clip (a 2-D input is taken as a mel)."""
        from freezeempath_jax.audio import log_mel_spectrogram

        a = np.asarray(audio, np.float32)
        if a.ndim == 2:
            if a.shape[0] != self.config.whisper.n_mels:
                raise ValueError(f"mel input has {a.shape[0]} bins; the encoder takes "
                                 f"{self.config.whisper.n_mels}")
            return a
        return log_mel_spectrogram(a, self.config.whisper.n_mels,
                                   pad_or_trim_seconds=self.audio_seconds)

    # -- prompts

    def _content(self, turn: Optional[Turn], speech_count: int, emo_count: int,
                 as_text: bool) -> List[int]:
        """User content ids: the template with placeholders, or transcript + label text."""
        if as_text:
            from freezeempath_jax.train.batches import teacher_content
            return self.codec.encode(teacher_content(turn.transcript or "(speech)",
                                                     turn.emotion))
        c = self.config
        ids: List[int] = []
        rest = c.user_template
        while rest:
            cut = [(rest.find(t), t) for t in (SPEECH, EMOTION) if rest.find(t) >= 0]
            if not cut:
                ids += self.codec.encode(rest)
                break
            pos, tag = min(cut)
            ids += self.codec.encode(rest[:pos])
            ids += ([c.speech_token_id] * speech_count if tag == SPEECH
                    else [c.emotion_token_id] * emo_count)
            rest = rest[pos + len(tag):]
        return ids

    def prompt_ids(self, earlier: Sequence[Turn], speech_count: int, emo_count: int
                   ) -> List[int]:
        """Prompt ids of a new speech turn after the `earlier` turns."""
        f, enc = self.fmt, self.codec.encode
        ids = [self.codec.bos_id] if f.use_bos and self.codec.bos_id is not None else []
        for i, t in enumerate(earlier):
            as_text = self.history == "text" or t.speech_embeds is None
            n_s = 0 if t.speech_embeds is None else len(t.speech_embeds)
            n_q = 0 if t.emotion_embedding is None else len(t.emotion_embedding)
            ids += enc(f.first_prefix if i == 0 else f.user_prefix)
            ids += self._content(t, n_s, n_q, as_text) + enc(f.suffix)
            ids += list(t.reply_ids) + enc(f.turn_end)
        ids += enc(f.first_prefix if not earlier else f.user_prefix)
        return ids + self._content(None, speech_count, emo_count, False) + enc(f.suffix)

    def _fit(self, conv: Conversation, speech_count: int, emo_count: int,
             max_new_tokens: int):
        """(kept turns, prompt ids, dropped count) within the context limit."""
        turns = list(conv.turns)
        dropped = 0
        while True:
            ids = self.prompt_ids(turns, speech_count, emo_count)
            if len(ids) + max_new_tokens <= self.max_context:
                break
            if not turns:
                raise ValueError(f"a single turn needs {len(ids)} prompt tokens + "
                                 f"{max_new_tokens} new tokens, over the context limit of "
                                 f"{self.max_context}")
            turns.pop(0)
            dropped += 1
        if dropped:
            warnings.warn(f"conversation longer than the context limit ({self.max_context} "
                          f"tokens): dropped its {dropped} oldest turn(s)", stacklevel=3)
        return turns, ids, dropped

    # -- a turn

    def respond(self, audios: Sequence[Any], conversations: Optional[Sequence[Conversation]]
                = None, transcripts: Optional[Sequence[Optional[str]]] = None, *,
                max_new_tokens: int = 256, temperature: float = 0.7,
                top_k: Optional[int] = None, top_p: Optional[float] = None, seed=42,
                speech: bool = True, pad_batch_to: Optional[int] = None) -> List[Reply]:
        """Answers one spoken turn per conversation (a batch).

        audios: 16 kHz float clips or [n_mels, frames] mels. conversations: one per clip
        (their earlier turns are used and the new turn is appended); None for single turns.
        transcripts: optional text of each clip, kept for history="text". speech: also
        generate units when the model has a speech decoder. pad_batch_to: pad the batch
        (with copies of the first clip) to this size so every batch shares compiled code.
        Release defaults: temperature 0.7, 256 new tokens, seed 42.
        """
        b = len(audios)
        if b == 0:
            return []
        if conversations is not None and len(conversations) != b:
            raise ValueError(f"{len(conversations)} conversations for {b} clips")
        if transcripts is not None and len(transcripts) != b:
            raise ValueError(f"{len(transcripts)} transcripts for {b} clips")
        c = self.config
        mels = [self.mel(a) for a in audios]
        width = max(b, pad_batch_to or 0)
        mels += [mels[0]] * (width - b)
        speech_e, emo_e, ser = jax.device_get(self._encode(self.params, jnp.asarray(
            np.stack(mels))))
        s_count, q_count = speech_e.shape[1], emo_e.shape[1]

        rows, values_s, values_q, dropped = [], [], [], []
        for i in range(width):
            conv = conversations[i] if conversations is not None and i < b else Conversation()
            kept, ids, d = self._fit(conv, s_count, q_count, max_new_tokens)
            spliced = [t for t in kept if self.history == "embeddings"
                       and t.speech_embeds is not None]
            values_s.append(np.concatenate([t.speech_embeds for t in spliced] + [speech_e[i]]))
            values_q.append(np.concatenate([t.emotion_embedding for t in spliced]
                                           + [emo_e[i]]))
            rows.append(ids)
            dropped.append(d)
        t_len = _bucket(max(len(r) for r in rows), self.prompt_bucket)
        ids = np.full((width, t_len), self.codec.pad_id, np.int32)
        mask = np.zeros((width, t_len), np.int32)
        for i, r in enumerate(rows):
            ids[i, t_len - len(r):] = r
            mask[i, t_len - len(r):] = 1

        def stack(vals):
            n = max(len(v) for v in vals)
            out = np.zeros((width, n) + vals[0].shape[1:], vals[0].dtype)
            for i, v in enumerate(vals):
                out[i, :len(v)] = v
            return jnp.asarray(out)

        embeds = self._embed(self.params, jnp.asarray(ids), stack(values_s), stack(values_q))
        gen = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, seed=seed, eos_token_id=self.codec.eos_ids,
                   pad_token_id=self.codec.pad_id)
        units = None
        if speech and c.speech_decoder is not None:
            from freezeempath_jax.speech_generation import generate_speech
            out = generate_speech(c.llm, self.params["llm"], c.speech_decoder,
                                  self.params["speech_decoder"], embeds, mask,
                                  max_units=self.max_units, **gen)
            text_ids, units = out.text_ids(), out.unit_ids()
        else:
            out = sampling_lib.generate_from_embeds(c.llm, self.params["llm"], embeds, mask,
                                                    keep_hidden=False, **gen)
            toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
            text_ids = [toks[i, :lens[i]].tolist() for i in range(width)]

        probs = np.asarray(jax.nn.softmax(jnp.asarray(ser, jnp.float32), axis=-1))
        replies = []
        for i in range(b):
            label = c.emotions[int(np.argmax(probs[i]))]
            text = self.codec.decode(text_ids[i])
            replies.append(Reply(text=text, text_ids=text_ids[i],
                                 units=None if units is None else units[i], emotion=label,
                                 probabilities={e: float(p) for e, p in zip(c.emotions,
                                                                            probs[i])},
                                 dropped_turns=dropped[i]))
            if conversations is not None:
                conv = conversations[i]
                if dropped[i]:
                    del conv.turns[:dropped[i]]
                keep_emb = self.history == "embeddings"
                conv.turns.append(Turn(
                    reply_ids=text_ids[i], reply=text, emotion=label,
                    transcript=None if transcripts is None else transcripts[i],
                    speech_embeds=speech_e[i] if keep_emb else None,
                    emotion_embedding=emo_e[i] if keep_emb else None))
        return replies


class Chatbot:
    """One running conversation: `bot(audio) -> Reply`, remembering earlier turns."""

    def __init__(self, model: ChatModel, **generation):
        self.model = model
        self.conversation = Conversation()
        self.generation = generation

    def __call__(self, audio, transcript: Optional[str] = None, **overrides) -> Reply:
        kw = dict(self.generation, **overrides)
        return self.model.respond([audio], [self.conversation], [transcript], **kw)[0]

    def reset(self):
        self.conversation = Conversation()


# ---------------------------------------------------------------------------------------------
# Loading a model


def load_config_file(path: str):
    """`get_config()` of a `configs/*.py` file (`file.py:arg` passes `arg` to it)."""
    arg = None
    if ":" in os.path.basename(path):
        path, arg = path.rsplit(":", 1)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location("_chat_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise ValueError(f"config file {path!r} defines no get_config()")
    return mod.get_config() if arg is None else mod.get_config(arg)


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                        else x, tree)


def _merge(base: dict, update: dict) -> dict:
    from freezeempath_jax import params as P_
    flat = P_.flatten_with_paths(base)
    new = P_.flatten_with_paths(update)
    unknown = sorted(set(new) - set(flat))
    if unknown:
        raise ValueError(f"loaded parameters the model does not have: {unknown[:8]}")
    for k, v in new.items():
        if tuple(np.shape(v)) != tuple(np.shape(flat[k])):
            raise ValueError(f"parameter {k}: loaded shape {np.shape(v)}, model shape "
                             f"{np.shape(flat[k])}")
        flat[k] = jnp.asarray(v, jnp.result_type(flat[k]))
    return P_.unflatten(flat)


def model_from_training_config(cfg, workdir: Optional[str] = None, **kwargs) -> ChatModel:
    """A ChatModel from a training config (ConfigDict or dict): parameters as the trainer
    builds them (random init seeded by train.seed, parts from `config.init`, trained parts
    of `init.previous` workdirs), then the trained parts saved in `workdir` if given."""
    from freezeempath_jax.train import checkpointing
    from freezeempath_jax.train.batches import make_tokenizer
    from freezeempath_jax.train.state import init_boxed_params

    get = (lambda d, k, default=None: d.get(k, default)) if isinstance(cfg, dict) else (
        lambda d, k, default=None: getattr(d, k, default))
    model_cfg = from_dict(FreezeEmpathConfig, get(cfg, "model"))
    train, data, init = get(cfg, "train", {}) or {}, get(cfg, "data", {}) or {}, get(
        cfg, "init", {}) or {}
    frozen_dtype = to_dtype(get(train, "frozen_dtype", "float32") or "float32")
    p_rng, _ = jax.random.split(jax.random.PRNGKey(int(get(train, "seed", 0) or 0)))
    params = nn.meta.unbox(jax.jit(lambda r: init_boxed_params(model_cfg, r))(p_rng))
    params = _cast_floats(params, frozen_dtype)
    if get(init, "freezeempath"):
        from freezeempath_jax.checkpoints import load_freezeempath
        params = _merge(params, load_freezeempath(get(init, "freezeempath"),
                                                  whisper=get(init, "whisper") or None,
                                                  dtype=frozen_dtype)[1])
    else:
        if get(init, "whisper"):
            from freezeempath_jax.checkpoints import load_whisper_encoder
            params = _merge(params, {"whisper": load_whisper_encoder(
                get(init, "whisper"), dtype=frozen_dtype)[1]})
        if get(init, "llm"):
            from freezeempath_jax.checkpoints import load_causal_lm
            params = _merge(params, {"llm": load_causal_lm(get(init, "llm"),
                                                           dtype=frozen_dtype)[1]})
    for prev in list(get(init, "previous", ()) or ()) + ([workdir] if workdir else []):
        trained, _ = checkpointing.load_trained_params(prev)
        params = _merge(params, _cast_floats(trained, jnp.float32))
    spec = get(data, "tokenizer", "byte") or "byte"
    if spec == "auto":  # as the trainer reads it: the tokenizer stored with the LLM weights
        spec = get(init, "freezeempath") or get(init, "llm")
        if not spec:
            raise ValueError("data.tokenizer='auto' takes the tokenizer of init.llm or "
                             "init.freezeempath, but neither is set")
    tok = make_tokenizer(model_cfg, spec)
    kwargs.setdefault("chat_template", get(data, "chat_template", "plain") or "plain")
    kwargs.setdefault("audio_seconds", float(get(data, "audio_seconds", MAX_SECONDS)
                                             or MAX_SECONDS))
    return ChatModel(model_cfg, params, tok, **kwargs)


def load_chat_model(model: Union[str, os.PathLike, FreezeEmpathConfig], **kwargs) -> ChatModel:
    """A ChatModel from a config file (`configs/*.py`), a training workdir (config.json +
    checkpoints/) or a converted checkpoint directory (the checkpoints package's format).
    kwargs go to `ChatModel` (history, max_context, ...)."""
    if isinstance(model, FreezeEmpathConfig):
        from freezeempath_jax.models.configs import to_dict
        return model_from_training_config({"model": to_dict(model)}, **kwargs)
    path = os.fspath(model)
    if path.split(":")[0].endswith(".py"):
        return model_from_training_config(load_config_file(path), **kwargs)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path!r}: not a config file (.py) or a checkpoint "
                                "directory")
    if os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(
            os.path.join(path, "checkpoints")):
        with open(os.path.join(path, "config.json")) as f:
            return model_from_training_config(json.load(f), workdir=path, **kwargs)
    from freezeempath_jax import checkpoints
    kind, config, params = checkpoints.load_converted(path)
    if kind != "freezeempath":
        raise ValueError(f"{path!r} holds a converted {kind!r} checkpoint; chat needs a full "
                         "FreezeEmpath model (convert --kind freezeempath)")
    tok_dir = os.path.join(path, "tokenizer")
    if not os.path.isdir(tok_dir):
        raise FileNotFoundError(f"{path!r} has no tokenizer/ folder; convert the checkpoint "
                                "with its tokenizer")
    kwargs.setdefault("chat_template", "qwen")
    return ChatModel(config, params, checkpoints.load_tokenizer(tok_dir), **kwargs)


# ---------------------------------------------------------------------------------------------
# The chat command


def read_items(input_path: str) -> List[dict]:
    """Items `{"id", "audio"}` of a JSONL manifest (release format; `question_id` and
    `speech` are accepted as aliases; relative audio paths resolve against the manifest's
    folder when they do not exist as given) or of a single audio file."""
    if not os.path.exists(input_path):
        raise FileNotFoundError(f"--input {input_path!r} does not exist")
    if not input_path.endswith((".jsonl", ".json")):
        return [{"id": os.path.splitext(os.path.basename(input_path))[0], "audio": input_path}]
    base = os.path.dirname(os.path.abspath(input_path))
    items = []
    with open(input_path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                items.append({"id": f"line{n}", "audio": None,
                              "error": f"{input_path}:{n}: not JSON ({e})"})
                continue
            qid = rec.get("id", rec.get("question_id", f"line{n}"))
            audio = rec.get("audio", rec.get("speech"))
            item = {"id": qid, "audio": audio}
            if not isinstance(audio, str) or not audio:
                item["error"] = f"{input_path}:{n}: no 'audio' path in the record"
            elif not os.path.isabs(audio) and not os.path.exists(audio):
                item["audio"] = os.path.join(base, audio)
                item["shown_audio"] = audio
            items.append(item)
    return items


def _load_checked(path: str, max_seconds: float) -> np.ndarray:
    from freezeempath_jax.audio import load_audio

    audio = load_audio(path)
    secs = len(audio) / 16000.0
    if secs > max_seconds:
        raise ValueError(f"audio file {path!r} lasts {secs:.1f} s, over the {max_seconds:.0f} s "
                         "the encoder hears")
    return audio


def run_chat(model_path_or_config, input_path: str, output_path: str, *,
             temperature: float = 0.7, max_new_tokens: int = 256, seed: int = 42,
             batch_size: int = 4, top_k: Optional[int] = None, top_p: Optional[float] = None,
             max_seconds: float = MAX_SECONDS, progress: bool = True,
             speech: bool = True) -> int:
    """Answers every item of `input_path` (one audio file or a JSONL manifest) into
    `output_path` (JSONL, one line per item, flushed as written). Returns the number of
    items that failed.

    Output lines: `question_id`, `audio`, `prediction` (text), `prediction_units` (space-
    separated unit ids as the release writes them; null without a speech decoder),
    `emotion` ({"label", "probabilities"}); a failed item (missing, unreadable or empty
    audio, over `max_seconds`) gets `error` instead and the others go on. Batches are
    padded to `batch_size` so one compiled shape serves all; batch i samples with
    fold_in(key(seed), i).
    """
    from tqdm import tqdm

    items = read_items(input_path)
    chat_model = (model_path_or_config if isinstance(model_path_or_config, ChatModel)
                  else load_chat_model(model_path_or_config))
    failed = 0
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    base_key = jax.random.key(int(seed))
    with open(output_path, "w") as out, tqdm(total=len(items), desc="chat", unit="item",
                                             disable=not progress) as bar:
        def write(rec):
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            out.flush()

        def error(item, msg):
            nonlocal failed
            failed += 1
            write({"question_id": item["id"], "audio": item.get("shown_audio", item["audio"]),
                   "error": msg})

        for bi, start in enumerate(range(0, len(items), batch_size)):
            batch = items[start:start + batch_size]
            good, audios = [], []
            for it in batch:
                if "error" in it:
                    continue
                try:
                    audios.append(_load_checked(it["audio"], max_seconds))
                    good.append(it)
                except (ValueError, OSError) as e:
                    it["error"] = str(e)
            results = {}
            if good:
                try:
                    replies = chat_model.respond(
                        audios, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=jax.random.fold_in(base_key, bi),
                        speech=speech, pad_batch_to=batch_size)
                    results = {id(it): r for it, r in zip(good, replies)}
                except Exception as e:  # one bad batch must not end the run
                    log.exception("batch %d failed", bi)
                    for it in good:
                        it["error"] = f"{type(e).__name__}: {e}"
            for it in batch:
                if "error" in it:
                    error(it, it["error"])
                    continue
                r = results[id(it)]
                write({"question_id": it["id"], "audio": it.get("shown_audio", it["audio"]),
                       "prediction": r.text,
                       "prediction_units": None if r.units is None else " ".join(
                           str(u) for u in r.units),
                       "emotion": {"label": r.emotion, "probabilities": r.probabilities}})
            bar.update(len(batch))
    return failed
