"""Spoken chat with a FreezeEmpath model: one turn is audio in -> emotion (SER head), reply
text and speech units; conversations keep earlier turns.

A turn, batched over B conversations:

    audio -> log-mel -> FreezeEmpath.encode_speech -> speech embeds [S, H], emotion embed
    [Q, H], SER logits -> label + probabilities
    prompt ids (chat frame; the user turn `config.user_template` with S speech and Q emotion
    placeholder ids; earlier turns before it) -> FreezeEmpath.prompt_embeds (splice)
    -> speech_generation.generate_speech (text + units, with a speech decoder)
       or sampling.generate_from_embeds (text only)

Earlier turns are kept (`history`): "embeddings" re-splices each earlier turn's speech and
emotion embeddings (the model hears them again), "text" replaces them with the transcript
given for that turn (or "(speech)") and its predicted emotion label, as the stage-2b teacher
prompt writes it. The assistant's earlier replies are kept as the ids it generated. Turns
are dropped oldest first, with a warning, when the prompt plus `max_new_tokens` would exceed
the context limit.

Dual thinking (OSUM-EChat recipe, `dual_thinking=True`): the assistant turn opens with a
short paralinguistic analysis written from the heads' predictions ("(The user sounds like a
woman, and sad.)", `text.paralinguistic_analysis`), placed in the prompt; the frozen LLM
writes the reply after it. `Reply.analysis` holds it and `Reply.text` the reply alone (what
is spoken); the conversation keeps both as the assistant's turn.

Prompt text follows `text.ChatFormat` ("plain" or "qwen"), the frame training uses too.
Loading a model for chat is `inference.loading`; the `chat` command is `inference.cli`.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from freezeempath_jax import sharding as sharding_lib
from freezeempath_jax.audio import log_mel_spectrogram
from freezeempath_jax.checkpoints.model_tree import abstract_boxed_params
from freezeempath_jax.inference import sampling as sampling_lib
from freezeempath_jax.inference.speech_generation import generate_speech, stream_speech
from freezeempath_jax.inference.voice import Voice
from freezeempath_jax.models.configs import AGE_GROUPS, GENDERS, FreezeEmpathConfig
from freezeempath_jax.models.freezeempath import FreezeEmpath, SpeechFeatures
from freezeempath_jax.text.padding import left_pad, round_up
from freezeempath_jax.text.prompts import (ChatFormat, dual_thinking_prefix,
                                           expand_placeholders, paralinguistic_analysis,
                                           teacher_content)
from freezeempath_jax.text.tokenizers import Codec

log = logging.getLogger(__name__)

MAX_SECONDS = 30.0  # the encoder hears 30 s; longer input would be cut silently


# ---------------------------------------------------------------------------------------------
# Conversations


@dataclasses.dataclass
class Turn:
    """One finished exchange, as kept in a conversation."""

    reply_ids: List[int]
    reply: str
    emotion: str
    transcript: Optional[str] = None
    speech_embeds: Optional[Any] = None  # [S, H] (history="embeddings"; a device array)
    emotion_embedding: Optional[Any] = None  # [Q, H]


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
    # paralinguistic heads' predictions ({"gender": "female", "age": "young"}); {} without
    cues: Dict[str, str] = dataclasses.field(default_factory=dict)
    analysis: Optional[str] = None  # dual thinking: the analysis that opened the turn
    analysis_ids: List[int] = dataclasses.field(default_factory=list)
    audio: Optional[np.ndarray] = None  # spoken reply (float32) when the model has a voice
    sampling_rate: Optional[int] = None  # of `audio`
    audio_error: Optional[str] = None  # why the units could not be spoken (this row only)
    heard: Optional[str] = None  # snapped speech: what the LLM read as text (`ChatModel.heard`)


@dataclasses.dataclass
class EncodedTurn:
    """The encoder's view of one batch of clips (padded to `width` rows)."""

    speech: jax.Array  # [W, S, H] speech embeddings (on the device)
    emotion: jax.Array  # [W, Q, H] emotion embeddings (on the device)
    ser_logits: np.ndarray  # [W, C]
    cue_logits: Optional[Dict[str, np.ndarray]] = None  # {"gender": [W, 2], ...}
    # [W, S] bool on the host with `projector.snap_compact` (kept positions last); None: all
    speech_mask: Optional[np.ndarray] = None
    speech_ids: Optional[np.ndarray] = None  # [W, S] snapped token ids (host), or None
    # [W, Q] bool on the host with `emotion.snap_phrases` (the phrase's slots last); None: all
    emotion_mask: Optional[np.ndarray] = None

    @staticmethod
    def _first_kept(values, mask: Optional[np.ndarray], i: int) -> int:
        """Row i's first slot the LLM reads: 0 without a mask, else the first of the kept
        slots, which come last in the row."""
        return 0 if mask is None else int(values.shape[1] - np.sum(mask[i]))

    def _kept(self, i: int) -> int:
        """Row i's first speech position the LLM reads."""
        return self._first_kept(self.speech, self.speech_mask, i)

    def row_emotion(self, i: int) -> jax.Array:
        """Row i's emotion embeddings as the LLM reads them [Q_i, H]: all Q, or with snapped
        phrases only the recognised class's phrase (empty for an empty phrase)."""
        return self.emotion[i, self._first_kept(self.emotion, self.emotion_mask, i):]

    def row_speech(self, i: int) -> jax.Array:
        """Row i's speech embeddings as the LLM reads them [S_i, H]: all S, or with
        compaction only the kept positions (the last `speech_mask[i].sum()`)."""
        return self.speech[i, self._kept(i):]

    def row_tokens(self, i: int) -> Optional[List[int]]:
        """With snapped speech, the token ids row i's LLM reads (None otherwise)."""
        if self.speech_ids is None:
            return None
        return [int(t) for t in self.speech_ids[i, self._kept(i):]]


@dataclasses.dataclass
class Prompts:
    """Left-padded prompt ids of a batch and the embeddings to splice into them."""

    ids: np.ndarray  # [W, T]
    mask: np.ndarray  # [W, T]
    speech: np.ndarray  # [W, S_total, H]: every spliced turn's speech embeddings, in order
    emotion: np.ndarray  # [W, Q_total, H]
    dropped: List[int]  # earlier turns dropped per row to fit the context
    analyses: Optional[List[Optional[str]]] = None  # dual thinking: each row's analysis
    analysis_ids: Optional[List[List[int]]] = None  # its ids, at the end of the prompt


def stack_rows(vals: Sequence[Any]) -> jax.Array:
    """Rows of different lengths -> one zero-padded [W, N, ...] array, built where the rows
    live (the device, for embeddings `encode` computed: they never visit the host)."""
    n = max(1, max(len(v) for v in vals))  # splice needs one value even with no placeholder
    return jnp.stack([jnp.pad(jnp.asarray(v), [(0, n - len(v))] + [(0, 0)] * (v.ndim - 1))
                      for v in vals])


class ChatModel:
    """A FreezeEmpath model ready to answer spoken turns.

    config / params: the composite model (params tree with whisper, projector, emotion, llm
    and optionally speech_decoder). tokenizer: see `text.Codec`. chat_template: "plain" |
    "qwen" | "chatml" (`text.ChatFormat`).
    audio_seconds: clips are padded / cut to this (30 s for real Whisper; the length the model
    was trained with). history: "embeddings" | "text" (see the module docstring).
    max_context: prompt + reply limit (default the LLM's max_position_embeddings).
    dual_thinking: open each assistant turn with the paralinguistic analysis of the heads'
    predictions (see the module docstring).
    mesh: a `jax.sharding.Mesh` (axes data, fsdp, tensor; `sharding.make_mesh`) to run on, or
    None for one device. The parameters are placed by their logical axis names and `rules`
    (default `sharding.DEFAULT_RULES`, training's), and every step is traced under the mesh
    and rules, so activations follow the same constraints as in training (dimensions a mesh
    axis does not divide stay replicated).

    A turn (`respond`) is three steps: `encode` (clips -> speech / emotion embeddings and SER
    logits), `build_prompts` (conversation history + the new turn -> padded ids and the
    embeddings to splice) and `generate` (text, and units with a speech decoder).
    """

    def __init__(self, config: FreezeEmpathConfig, params, tokenizer, *,
                 chat_template: str = "qwen", audio_seconds: float = MAX_SECONDS,
                 history: str = "embeddings", max_context: Optional[int] = None,
                 max_units: Optional[int] = None, prompt_bucket: int = 32,
                 dual_thinking: bool = False, mesh=None, rules=None,
                 unit_decoder=None, unit_temperature: float = 1.0):
        if history not in ("embeddings", "text"):
            raise ValueError(f"history must be 'embeddings' or 'text', got {history!r}")
        frames = int(round(audio_seconds * 100))  # 10 ms hop
        if frames < 2 * config.whisper.max_source_positions and not \
                config.whisper.allow_short_inputs:
            # The model was trained on clips shorter than 30 s; the encoder must accept them.
            config = dataclasses.replace(config, whisper=dataclasses.replace(
                config.whisper, allow_short_inputs=True))
        self.mesh = mesh
        self.rules = sharding_lib.rules_from_config(rules)
        if mesh is not None:
            params = sharding_lib.place_params(params, abstract_boxed_params(config), mesh,
                                               self.rules)
        self.config, self.params = config, params
        self.codec = tokenizer if isinstance(tokenizer, Codec) else Codec(tokenizer)
        self.fmt = ChatFormat.named(chat_template, config.system_prompt)
        self.audio_seconds = float(audio_seconds)
        self.history = history
        self.max_context = int(max_context or config.llm.max_position_embeddings)
        self.max_units = max_units
        self.prompt_bucket = int(prompt_bucket)
        self.dual_thinking = bool(dual_thinking)
        self.voice = None if unit_decoder is None else Voice(unit_decoder)
        self.unit_temperature = float(unit_temperature)
        model = FreezeEmpath(config)
        self._encode = jax.jit(lambda p, mel: model.apply(
            {"params": p}, mel, method=FreezeEmpath.encode_features))
        self._embed = jax.jit(lambda p, ids, speech, emo: model.apply(
            {"params": p}, ids, SpeechFeatures(speech, emo, None),
            method=FreezeEmpath.prompt_embeds))

    # -- features

    def mel(self, audio) -> np.ndarray:
        """[n_mels, frames] features of a 16 kHz clip (a 2-D input is taken as a mel)."""
        a = np.asarray(audio, np.float32)
        if a.ndim == 2:
            if a.shape[0] != self.config.whisper.n_mels:
                raise ValueError(f"mel input has {a.shape[0]} bins; the encoder takes "
                                 f"{self.config.whisper.n_mels}")
            return a
        return log_mel_spectrogram(a, self.config.whisper.n_mels,
                                   pad_or_trim_seconds=self.audio_seconds)

    def encode(self, audios: Sequence[Any], width: int) -> EncodedTurn:
        """Step 1: clips -> embeddings and SER logits, the batch padded to `width` rows
        (copies of the first clip) so every batch shares compiled code."""
        mels = [self.mel(a) for a in audios]
        mels += [mels[0]] * (width - len(mels))
        with self.context():
            f = self._encode(self.params, jnp.asarray(np.stack(mels)))
        # The embeddings stay on the device (spliced into the prompt there, kept there in the
        # history); only the small head outputs come to the host.
        ser, cues, keep, ids, emo_keep = jax.device_get((f.ser_logits, f.cue_logits,
                                                          f.speech_mask, f.speech_ids,
                                                          f.emotion_mask))
        return EncodedTurn(f.speech_embeds, f.emotion_embedding, ser, cues, keep, ids, emo_keep)

    def heard(self, enc: EncodedTurn) -> Optional[List[str]]:
        """With snapped speech (`projector.snap_to_vocab`), what the LLM reads for each row as
        text (the tokens whose embeddings were spliced, e.g. "How do I cook pancakes");
        None for continuous speech embeddings."""
        if enc.speech_ids is None:
            return None
        return [self.codec.decode(enc.row_tokens(i)) for i in range(len(enc.speech))]

    def cue_labels(self, enc: EncodedTurn) -> List[Dict[str, str]]:
        """Each row's paralinguistic predictions ({"gender": "female", "age": "young"})."""
        classes = {"gender": GENDERS, "age": AGE_GROUPS}
        rows: List[Dict[str, str]] = [{} for _ in range(len(enc.ser_logits))]
        for name, logits in (enc.cue_logits or {}).items():
            for i, k in enumerate(np.argmax(np.asarray(logits), axis=-1)):
                rows[i][name] = classes[name][int(k)]
        return rows

    def analyses(self, enc: EncodedTurn) -> List[str]:
        """Dual thinking: each row's analysis from the SER head and the paralinguistic
        heads (`text.paralinguistic_analysis`)."""
        emotions = self.config.emotions
        out = []
        for i, cues in enumerate(self.cue_labels(enc)):
            emo = emotions[int(np.argmax(enc.ser_logits[i]))]
            out.append(paralinguistic_analysis(emo, cues.get("gender"), cues.get("age")))
        return out

    def context(self):
        """The mesh and logical-axis rules every jitted step runs under (nothing without a
        mesh)."""
        return sharding_lib.mesh_rules(self.mesh, self.rules)

    # -- prompts

    def _content(self, turn: Optional[Turn], speech_count: int, emo_count: int,
                 as_text: bool) -> List[int]:
        """User content ids: the template with placeholders, or transcript + label text."""
        if as_text:
            return self.codec.encode(teacher_content(turn.transcript or "(speech)",
                                                     turn.emotion))
        c = self.config
        return expand_placeholders(c.user_template, self.codec.encode,
                                   speech_id=c.speech_token_id, num_speech=speech_count,
                                   emotion_id=c.emotion_token_id, num_emotion=emo_count)

    def prompt_ids(self, earlier: Sequence[Turn], speech_count: int, emo_count: int
                   ) -> List[int]:
        """Prompt ids of a new speech turn after the `earlier` turns."""
        f, enc = self.fmt, self.codec.encode
        ids = [self.codec.bos_id] if f.use_bos and self.codec.bos_id is not None else []
        for i, t in enumerate(earlier):
            as_text = self.history == "text" or t.speech_embeds is None
            n_s = 0 if t.speech_embeds is None else len(t.speech_embeds)
            n_q = 0 if t.emotion_embedding is None else len(t.emotion_embedding)
            ids += enc(f.prefix if i == 0 else f.user_prefix)
            ids += self._content(t, n_s, n_q, as_text) + enc(f.suffix)
            ids += list(t.reply_ids) + enc(f.turn_end)
        ids += enc(f.prefix if not earlier else f.user_prefix)
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
                          f"tokens): dropped its {dropped} oldest turn(s)", stacklevel=4)
        return turns, ids, dropped

    def build_prompts(self, enc: EncodedTurn, conversations: Optional[Sequence[Conversation]],
                      n_real: int, max_new_tokens: int) -> Prompts:
        """Step 2: each row's history (earlier turns that fit the context) plus the new turn
        -> left-padded ids (length bucketed to `prompt_bucket`) and the embeddings of every
        spliced turn."""
        width = len(enc.speech)
        analyses = self.analyses(enc) if self.dual_thinking else None
        thought = ([self.codec.encode(dual_thinking_prefix(a)) for a in analyses]
                   if analyses is not None else [[] for _ in range(width)])
        rows, values_s, values_q, dropped = [], [], [], []
        for i in range(width):
            conv = (conversations[i] if conversations is not None and i < n_real
                    else Conversation())
            speech_i, emotion_i = enc.row_speech(i), enc.row_emotion(i)
            kept, ids, d = self._fit(conv, len(speech_i), len(emotion_i),
                                     max_new_tokens + len(thought[i]))
            ids = ids + thought[i]
            spliced = [t for t in kept if self.history == "embeddings"
                       and t.speech_embeds is not None]
            values_s.append(jnp.concatenate([jnp.asarray(t.speech_embeds) for t in spliced]
                                            + [speech_i]))
            values_q.append(jnp.concatenate([jnp.asarray(t.emotion_embedding)
                                             for t in spliced] + [emotion_i]))
            rows.append(ids)
            dropped.append(d)
        ids, mask = left_pad(rows, self.codec.pad_id,
                             round_up(max(len(r) for r in rows), self.prompt_bucket))
        return Prompts(ids, mask, stack_rows(values_s), stack_rows(values_q), dropped,
                       analyses, thought if analyses is not None else None)

    # -- generation

    def generate(self, prompts: Prompts, *, speech: bool, **gen):
        """Step 3: splice the embeddings, then generate text (and units when the model has a
        speech decoder and `speech`). Returns (text ids per row, units per row or None)."""
        with self.context():
            return self._generate(prompts, speech=speech, **gen)

    def _generate(self, prompts: Prompts, *, speech: bool, **gen):
        c = self.config
        embeds = self._embed(self.params, jnp.asarray(prompts.ids), jnp.asarray(prompts.speech),
                             jnp.asarray(prompts.emotion))
        gen = dict(gen, eos_token_id=self.codec.eos_ids, pad_token_id=self.codec.pad_id)
        if speech and c.speech_decoder is not None:
            out = generate_speech(c.llm, self.params["llm"], c.speech_decoder,
                                  self.params["speech_decoder"], embeds, prompts.mask,
                                  max_units=self.max_units,
                                  unit_temperature=self.unit_temperature, **gen)
            return out.text_ids(), out.unit_ids()
        out = sampling_lib.generate_from_embeds(c.llm, self.params["llm"], embeds, prompts.mask,
                                                keep_hidden=False, **gen)
        toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
        return [toks[i, :lens[i]].tolist() for i in range(len(toks))], None

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
        enc = self.encode(audios, max(b, pad_batch_to or 0))
        prompts = self.build_prompts(enc, conversations, b, max_new_tokens)
        text_ids, units = self.generate(prompts, speech=speech, max_new_tokens=max_new_tokens,
                                        temperature=temperature, top_k=top_k, top_p=top_p,
                                        seed=seed)
        replies = self._replies(enc, text_ids, units, prompts, b)
        if self.voice is not None and speech and units is not None:
            self._speak(replies, seed)
        if conversations is not None:
            self._remember(conversations, transcripts, enc, replies)
        return replies

    def _replies(self, enc: EncodedTurn, text_ids, units, prompts: Prompts, b: int
                 ) -> List[Reply]:
        emotions = self.config.emotions
        probs = np.asarray(jax.nn.softmax(jnp.asarray(enc.ser_logits, jnp.float32), axis=-1))
        cues = self.cue_labels(enc)
        heard = self.heard(enc)
        # after the analysis's line break a tokenizer may open the reply with a space
        strip = (lambda t: t.lstrip()) if prompts.analyses is not None else (lambda t: t)
        return [Reply(text=strip(self.codec.decode(text_ids[i])), text_ids=text_ids[i],
                      units=None if units is None else units[i],
                      emotion=emotions[int(np.argmax(probs[i]))],
                      probabilities={e: float(p) for e, p in zip(emotions, probs[i])},
                      dropped_turns=prompts.dropped[i], cues=cues[i],
                      analysis=None if prompts.analyses is None else prompts.analyses[i],
                      analysis_ids=[] if prompts.analysis_ids is None
                      else list(prompts.analysis_ids[i]),
                      heard=None if heard is None else heard[i])
                for i in range(b)]

    def _speak(self, replies: List[Reply], seed):
        """Decodes each reply's units with the model's voice (seed: an int, else 0); units it
        cannot speak leave that reply's `audio_error` set and the others spoken."""
        s = int(seed) if isinstance(seed, (int, np.integer)) else 0
        for r in replies:
            try:
                r.audio = self.voice.decode(r.units, seed=s)
                r.sampling_rate = self.voice.sampling_rate
            except ValueError as e:
                r.audio_error = str(e)

    def stream_reply(self, audio, *, max_new_tokens: int = 256, temperature: float = 0.7,
                     top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 42,
                     chunk_units: int = 25):
        """Answers one clip (no history) and yields events as the reply is generated:
        `("text", new text ids)` after every round of the (N, M) loop, and
        `("audio", float32 chunk)` as soon as `chunk_units` new units are at hand (the last
        chunk holds what is left), so playback starts before the reply is complete. Needs
        a speech decoder and a voice (`unit_decoder=`)."""
        c = self.config
        if c.speech_decoder is None or self.voice is None:
            raise ValueError("stream_reply needs a model with a speech decoder and a "
                             "unit_decoder (voice)")
        enc = self.encode([audio], 1)
        prompts = self.build_prompts(enc, None, 1, max_new_tokens)
        embeds = self._embed(self.params, jnp.asarray(prompts.ids), jnp.asarray(prompts.speech),
                             jnp.asarray(prompts.emotion))
        rounds = stream_speech(
            c.llm, self.params["llm"], c.speech_decoder, self.params["speech_decoder"], embeds,
            prompts.mask, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, eos_token_id=self.codec.eos_ids,
            pad_token_id=self.codec.pad_id, unit_temperature=self.unit_temperature,
            max_units=self.max_units)
        buf: List[int] = []
        k = 0
        for text_delta, unit_delta in rounds:
            if text_delta[0]:
                yield "text", list(text_delta[0])
            buf.extend(int(u) for u in unit_delta[0])
            while len(buf) >= chunk_units:
                chunk, buf = buf[:chunk_units], buf[chunk_units:]
                yield "audio", self.voice._chunk(chunk, int(seed), k)
                k += 1
        if buf:
            yield "audio", self.voice._chunk(buf, int(seed), k)

    def _remember(self, conversations, transcripts, enc: EncodedTurn, replies: List[Reply]):
        """Appends each answered turn to its conversation (after dropping what did not fit)."""
        keep_emb = self.history == "embeddings"
        for i, (conv, r) in enumerate(zip(conversations, replies)):
            if r.dropped_turns:
                del conv.turns[:r.dropped_turns]
            conv.turns.append(Turn(
                reply_ids=list(r.analysis_ids) + list(r.text_ids), reply=r.text,
                emotion=r.emotion,
                transcript=None if transcripts is None else transcripts[i],
                speech_embeds=enc.row_speech(i) if keep_emb else None,
                emotion_embedding=enc.row_emotion(i) if keep_emb else None))


class Chatbot:
    """One running conversation: `bot(audio) -> Reply`, remembering earlier turns. With a
    model that has a speech decoder and a voice (`ChatModel(..., unit_decoder=...)`) the
    Reply carries the spoken reply (`audio`, `sampling_rate`)."""

    def __init__(self, model: ChatModel, **generation):
        self.model = model
        self.conversation = Conversation()
        self.generation = generation

    def __call__(self, audio, transcript: Optional[str] = None, **overrides) -> Reply:
        kw = dict(self.generation, **overrides)
        return self.model.respond([audio], [self.conversation], [transcript], **kw)[0]

    def reset(self):
        self.conversation = Conversation()
