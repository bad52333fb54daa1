"""Data records -> the static-shape batch dicts the train step reads (keys in `train.step`).

A record is a plain dict (one line of a JSONL manifest plus features added on load):
    mel [n_mels, frames] float32, or encoder_last [T, d] + encoder_layers [L, T, d]
    transcript: str                       (stage 1 teacher prompt)
    reply_ids: list[int] or reply: str    (target of stages 1 / 2b / 3)
    emotion: str and/or label: int        (stage 2a target text and SER label)
    attributes: [A] floats                (RE-LLM arousal / valence / dominance, optional)
    gender: "female" | "male", age_group: "young" | "middle-aged" | "older"
                                          (OSUM-EChat paralinguistic heads, optional)
    analysis: str                         (dual thinking: the assistant turn starts with it)
    units: list[int]                      (stage 3 speech units of the reply)
    task: "2a" | "2b"                     (stage 2b mixes rows of both tasks)

Every batch has the same shapes whatever the records hold: prompts have a fixed length (the
speech / emotion placeholders are expanded to the model's counts), replies are cut or
right-padded to `target_len`, units to `units_len`, and missing rows (the tail of an eval
set) are all-padding rows whose masks are zero, so they count in no loss and no metric.

Tokenizers and prompt text come from `freezeempath_jax.text` (`ByteTokenizer` for random tiny
models, `HFTokenizer` for real checkpoints; `ChatFormat` plain for the tiny model, the Qwen /
model chat template for real ones).

Sources (`MemorySource`, `MixedSource`) hand out lists of records in a seeded order and
expose `get_state()` / `set_state()` (JSON-able) so checkpoints resume the stream exactly.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from freezeempath_jax.models import streaming
from freezeempath_jax.models.configs import AGE_GROUPS, GENDERS, FreezeEmpathConfig
from freezeempath_jax.text.padding import round_up as _round_up
from freezeempath_jax.text.prompts import (SPEECH, ChatFormat, PromptBuilder, PromptRecipe,
                                           dual_thinking_prefix, emotion_statement,
                                           paralinguistic_analysis)


# ---------------------------------------------------------------------------------------------
# Batches

# Seconds per Whisper encoder frame: a stride-2 convolution over 10 ms mel hops.
ENCODER_FRAME_SECONDS = 0.02


def _label_of(rec: Mapping, emotions: Sequence[str]) -> int:
    if rec.get("label") is not None:
        return int(rec["label"])
    if rec.get("emotion") is not None:
        if rec["emotion"] not in emotions:
            raise ValueError(f"record {rec.get('id', '?')}: emotion {rec['emotion']!r} is not "
                             f"one of {tuple(emotions)}")
        return list(emotions).index(rec["emotion"])
    return -1


# Record field and class names of each paralinguistic head (`EmotionConfig.cue_heads`).
CUE_FIELDS = {"gender": ("gender", GENDERS), "age": ("age_group", AGE_GROUPS)}


def cue_label(rec: Optional[Mapping], name: str) -> int:
    """Class index of a record's paralinguistic label `name` ("gender" / "age"); -1 when the
    record has none. A value outside the classes is an error naming the record."""
    if rec is None:
        return -1
    field, classes = CUE_FIELDS[name]
    value = rec.get(field)
    if value is None or value == "":
        return -1
    if value not in classes:
        raise ValueError(f"record {rec.get('id', '?')}: {field} {value!r} is not one of "
                         f"{tuple(classes)}")
    return classes.index(value)


class BatchBuilder:
    """Records -> batch dict for one stage, with static shapes.

    objective: "distill_ce" | "distill_kl" | "emotion_ce" | "ser_ce" | "unit_ce" | "align_ctc"
    | "align_words" (train.step names).
    num_speech: speech placeholders per prompt (frames // k of the encoder outputs used).
    target_len: reply tokens kept (EOS included); teacher_len: teacher prompt tokens.
    recipe: the user-turn texts (`text.PromptRecipe`): stage 1 reads `recipe.stage1`, stage 2a
    its own `recipe.emotion_question`, 2b and 3 the chat turn (`model.user_template`); in 2b
    the mixed-in 2a rows (`task: "2a"`) keep the 2a question, so rows of one batch may carry
    prompts of different lengths (the sequence length fits the longest).
    dual_thinking (OSUM-EChat recipe, stage 2b): a chat row whose record holds an `analysis`
    gets it at the start of the assistant turn, as prompt (no loss); the target is the reply
    that follows it. The sequence length leaves room for the longest analysis.
    """

    def __init__(self, model: FreezeEmpathConfig, stage: str, objective: str, tokenizer,
                 num_speech: int, *, chat_template: str = "plain", target_len: int = 16,
                 teacher_len: int = 96, units_len: int = 64, stage1_template: str = SPEECH,
                 recipe: Optional[PromptRecipe] = None, dual_thinking: bool = False,
                 unit_chunks: str = "aligned"):
        if unit_chunks not in ("aligned", "fixed"):
            raise ValueError(f"data.unit_chunks {unit_chunks!r}: choose 'aligned' or 'fixed'")
        self.unit_chunks = unit_chunks
        self.model, self.stage, self.objective = model, stage, objective
        self.tok = tokenizer
        self.num_speech = int(num_speech)
        self.encoder_frames: Optional[int] = None  # set by the trainer (align_words timing)
        # align_words: what a position without a word should look like to the LLM. Measured
        # with SmolLM2-135M reading ideal layouts (each token's embedding repeated over its
        # span): a newline's embedding between and around the words keeps the reply on topic
        # as often as dropping the silent positions does (10/16 vs 9/16); zero vectors
        # derail it (1/16). "" = the zero vector.
        self.silence_text = "\n"
        self.target_len, self.teacher_len, self.units_len = target_len, teacher_len, units_len
        fmt = ChatFormat.named(chat_template, model.system_prompt)
        self.prompts = PromptBuilder(tokenizer, fmt, num_speech, model.emotion.num_tokens)
        self.recipe = recipe or PromptRecipe(stage1=stage1_template)
        templates = {"1": self.recipe.stage1, "2a": self.recipe.emotion_question}
        self.prompt = self._speech_prompt(templates.get(stage, model.user_template))
        # 2b mixes in 2a rows, which keep 2a's question
        self.task_prompts = ({"2a": self._speech_prompt(self.recipe.emotion_question)}
                             if stage == "2b" else {})
        longest = max([len(self.prompt)] + [len(p) for p in self.task_prompts.values()])
        self.dual_thinking = bool(dual_thinking)
        if self.dual_thinking and stage != "2b":
            raise ValueError(f"data.dual_thinking applies to stage 2b (chat rows with replies), "
                             f"not stage {stage}")
        self._analysis_ids: Dict[str, List[int]] = {}
        if self.dual_thinking:
            longest = len(self.prompt) + max(
                len(self.analysis_ids(paralinguistic_analysis(e, g, a)))
                for e in model.emotions for g in GENDERS + (None,)
                for a in AGE_GROUPS + (None,))
            longest = max([longest] + [len(p) for p in self.task_prompts.values()])
        self.seq_len = _round_up(longest + target_len, 8)
        # {feature: shape} of one row, for batches in which no record is usable (streamed
        # batches whose clips all failed to decode); None: taken from the first record.
        self.audio_shapes: Optional[Dict[str, tuple]] = None
        if objective == "unit_ce" and model.speech_decoder is None:
            raise ValueError(f"stage {stage} trains the speech decoder but the model config "
                             "has none")

    def _speech_prompt(self, template: str) -> np.ndarray:
        return np.asarray(self.prompts.speech_prompt(template), np.int32)

    # -- per-record pieces

    def analysis_ids(self, analysis: str) -> List[int]:
        """Token ids of a dual-thinking analysis as it opens the assistant turn (cached)."""
        if analysis not in self._analysis_ids:
            self._analysis_ids[analysis] = self.tok.encode(dual_thinking_prefix(analysis))
        return self._analysis_ids[analysis]

    def prompt_for(self, rec: Optional[Mapping]) -> np.ndarray:
        """The prompt ids of a record's row (padding rows take the stage's prompt); under
        dual thinking a chat row's prompt ends with its record's analysis."""
        if rec is not None and rec.get("task") in self.task_prompts:
            return self.task_prompts[rec["task"]]
        if self.dual_thinking and rec is not None and rec.get("analysis"):
            return np.concatenate([self.prompt, np.asarray(
                self.analysis_ids(rec["analysis"]), np.int32)])
        return self.prompt

    def reply_ids(self, rec: Mapping) -> List[int]:
        """Target token ids of a record for this stage (EOS appended, cut to target_len)."""
        if self.stage == "2a" or (self.stage == "2b" and rec.get("task") == "2a"):
            if rec.get("emotion") is None and rec.get("label") is None:
                raise ValueError(f"record {rec.get('id', '?')}: stage 2a needs an emotion")
            emo = rec.get("emotion") or self.model.emotions[int(rec["label"])]
            ids = self.tok.encode(emotion_statement(emo))
        elif rec.get("reply_ids") is not None:
            ids = [int(i) for i in rec["reply_ids"]]
        elif rec.get("reply") is not None:
            ids = self.tok.encode(rec["reply"])
        else:
            raise ValueError(f"record {rec.get('id', '?')}: stage {self.stage} needs a target "
                             "reply ('reply' text or 'reply_ids'); write them with "
                             "`freezeempath-jax distill` or let the trainer self-distill")
        ids = [i for i in ids if i != self.tok.eos_id][: self.target_len - 1]
        return ids + [self.tok.eos_id]

    def set_align_vocab(self, transcripts: Sequence[str], multiple: int = 256, seed: int = 0):
        """Candidate classes of `align_ctc`: every token of `transcripts`, padded with random
        other tokens (extra negatives) to a multiple of `multiple` (one static shape)."""
        seen = sorted({t for text in transcripts for t in self.tok.encode(text)})
        size = _round_up(max(len(seen), 1), multiple)
        vocab_size = self.model.llm.vocab_size
        rng = np.random.default_rng(seed)
        extra = [int(t) for t in rng.permutation(vocab_size) if int(t) not in set(seen)]
        vocab = np.asarray(seen + extra[:size - len(seen)], np.int32)
        self.align_vocab = vocab
        self._align_index = {int(t): i for i, t in enumerate(vocab)}

    def _transcripts(self, records) -> Dict[str, np.ndarray]:
        """align_ctc targets: the transcript's token ids (indices into `align_vocab` when it
        is set), cut to target_len."""
        b, n = len(records), self.target_len
        ids = np.zeros((b, n), np.int32)
        mask = np.zeros((b, n), np.float32)
        vocab = getattr(self, "align_vocab", None)
        for i, rec in enumerate(records):
            if rec is None:
                continue
            if not rec.get("transcript"):
                raise ValueError(f"record {rec.get('id', '?')}: objective align_ctc needs a "
                                 "transcript")
            t = self.tok.encode(rec["transcript"])[:n]
            if vocab is not None:
                missing = [x for x in t if x not in self._align_index]
                if missing:
                    raise ValueError(f"record {rec.get('id', '?')}: tokens {missing[:5]} are not "
                                     "in the align_ctc candidate vocabulary (set_align_vocab)")
                t = [self._align_index[x] for x in t]
            ids[i, :len(t)] = t
            mask[i, :len(t)] = 1.0
        out = {"transcript_ids": ids, "transcript_mask": mask}
        if vocab is not None:
            out["align_vocab"] = np.broadcast_to(vocab, (b, len(vocab))).copy()
        return out

    def position_tokens(self, rec: Mapping) -> np.ndarray:
        """align_words targets of one record: for each of the `num_speech` positions, the id
        of the token spoken at the position's centre; where no word is spoken, the last token
        of `silence_text` (-1, the zero vector, when it is empty).

        A position covers `encoder_frames / num_speech` encoder frames of 20 ms (Whisper's
        stride-2 convolution over 10 ms mel hops). Words come from the record's `words`
        ([[text, start s, end s], ...], eSpeak's word events in synthetic corpora); a word of
        several tokens shares its span among them evenly. Words are tokenized as they follow
        one another in the transcript (a space before every word but the first)."""
        words = rec.get("words")
        if not words:
            raise ValueError(f"record {rec.get('id', '?')}: objective align_words needs word "
                             "timings ('words': [[text, start s, end s], ...]); synthetic "
                             "corpora carry them (rebuild an older corpus)")
        if self.encoder_frames is None:
            raise ValueError("BatchBuilder.encoder_frames must be set for align_words")
        step = self.encoder_frames * ENCODER_FRAME_SECONDS / self.num_speech
        centres = (np.arange(self.num_speech) + 0.5) * step
        silence = self.tok.encode(self.silence_text)[-1] if self.silence_text else -1
        out = np.full((self.num_speech,), silence, np.int32)
        for j, w in enumerate(words):
            try:
                text, start, end = str(w[0]), float(w[1]), float(w[2])
            except (TypeError, ValueError, IndexError) as e:
                raise ValueError(f"record {rec.get('id', '?')}: word {j} is {w!r}, expected "
                                 "[text, start s, end s]") from e
            ids = self.tok.encode(text if j == 0 else " " + text)
            if not ids or end <= start:
                continue
            bounds = np.linspace(start, end, len(ids) + 1)
            for t, a, z in zip(ids, bounds[:-1], bounds[1:]):
                out[(centres >= a) & (centres < z)] = t
        return out

    def _word_positions(self, records) -> Dict[str, np.ndarray]:
        b, s = len(records), self.num_speech
        tokens = np.full((b, s), -1, np.int32)
        mask = np.zeros((b, s), np.float32)
        for i, rec in enumerate(records):
            if rec is not None:
                tokens[i], mask[i] = self.position_tokens(rec), 1.0
        out = {"position_tokens": tokens, "position_mask": mask}
        vocab = getattr(self, "align_vocab", None)
        if vocab is not None:
            out["align_vocab"] = np.broadcast_to(vocab, (b, len(vocab))).copy()
        return out

    def __call__(self, records: Sequence[Optional[Mapping]]) -> Dict[str, np.ndarray]:
        """Batch dict for `records` (None entries become all-padding rows)."""
        if self.objective == "align_ctc":  # no LLM pass: audio and transcripts only
            return {**self._audio(records), **self._transcripts(records)}
        if self.objective == "align_words":
            return {**self._audio(records), **self._word_positions(records)}
        b, t = len(records), self.seq_len
        pad = self.tok.pad_id
        input_ids = np.full((b, t), pad, np.int32)
        attention = np.zeros((b, t), np.int32)
        target_mask = np.zeros((b, t), np.float32)
        out: Dict[str, np.ndarray] = {}
        replies: List[List[int]] = []
        prompt_lens = np.zeros((b,), np.int32)
        for i, rec in enumerate(records):
            prompt = self.prompt_for(rec)
            p = prompt_lens[i] = len(prompt)
            input_ids[i, :p] = prompt  # padding rows keep a valid prompt
            if rec is None:
                replies.append([])
                attention[i, :p] = 1
                continue
            r = self.reply_ids(rec)
            replies.append(r)
            input_ids[i, p:p + len(r)] = r
            attention[i, :p + len(r)] = 1
            target_mask[i, p:p + len(r)] = 1
        targets = np.concatenate([input_ids[:, 1:], np.full((b, 1), pad, np.int32)], axis=1)
        loss_mask = np.concatenate([target_mask[:, 1:], np.zeros((b, 1), np.float32)], axis=1)
        # positions p-1 .. p+target_len-2 predict the reply: the only ones with loss
        out.update(input_ids=input_ids, attention_mask=attention, targets=targets,
                   loss_mask=loss_mask,
                   loss_positions=reply_positions(b, prompt_lens, self.target_len, t))
        out.update(self._audio(records))
        if self.objective == "distill_kl":
            out.update(self._teacher(records, replies))
        if self.objective in ("emotion_ce", "ser_ce"):
            # 2b rows keep their SER label when the clip has one; -1 marks "no label".
            labels = np.array([-1 if r is None else _label_of(r, self.model.emotions)
                               for r in records], np.int32)
            out["emotion_label"] = labels
            if self.model.emotion.num_attributes:
                a = self.model.emotion.num_attributes
                attrs = np.zeros((b, a), np.float32)
                amask = np.zeros((b,), np.float32)
                for i, rec in enumerate(records):
                    if rec is not None and rec.get("attributes") is not None:
                        attrs[i] = np.asarray(rec["attributes"], np.float32)[:a]
                        amask[i] = 1.0
                out.update(attributes=attrs, attr_mask=amask)
            for name, _ in self.model.emotion.cue_heads:
                out[f"{name}_label"] = np.array([cue_label(r, name) for r in records],
                                                np.int32)
        if self.objective == "unit_ce":
            out.update(self._units(records, replies))
        return out

    def _audio(self, records) -> Dict[str, np.ndarray]:
        first = next((r for r in records if r is not None), None)
        if first is None:
            if self.audio_shapes is None:
                raise ValueError("a batch needs at least one real record")
            return {k: np.zeros((len(records),) + tuple(shape), np.float32)
                    for k, shape in self.audio_shapes.items()}
        keys = (("encoder_last", "encoder_layers") if "encoder_last" in first else ("mel",))
        out = {}
        for k in keys:
            ref = np.asarray(first[k])
            rows = []
            for rec in records:
                if rec is None:
                    rows.append(np.zeros_like(ref))
                    continue
                if k not in rec:
                    raise ValueError(f"record {rec.get('id', '?')} lacks {k!r} (every record of "
                                     "a batch must carry the same audio features)")
                x = np.asarray(rec[k])
                if x.shape != ref.shape:
                    raise ValueError(f"record {rec.get('id', '?')}: {k} has shape {x.shape}, "
                                     f"expected {ref.shape} (pad / trim audio to one length)")
                rows.append(x)
            out[k] = np.stack(rows).astype(np.float32)
        return out

    def _teacher(self, records, replies) -> Dict[str, np.ndarray]:
        """Teacher rows: the transcript prompt followed by the same reply tokens."""
        b, t = len(records), _round_up(self.teacher_len + self.target_len, 8)
        ids = np.full((b, t), self.tok.pad_id, np.int32)
        att = np.zeros((b, t), np.int32)
        tmask = np.zeros((b, t), np.float32)
        prompt_lens = np.ones((b,), np.int32)
        for i, (rec, r) in enumerate(zip(records, replies)):
            if rec is None:
                ids[i, 0] = self.tok.pad_id
                att[i, 0] = 1
                continue
            if rec.get("transcript") is None:
                raise ValueError(f"record {rec.get('id', '?')}: the KL teacher needs a "
                                 "transcript")
            prompt = self.prompts.text_prompt(self.recipe.teacher_text(rec["transcript"])
                                              )[: self.teacher_len]
            row = prompt + r
            ids[i, :len(row)] = row
            att[i, :len(row)] = 1
            tmask[i, len(prompt) - 1:len(row) - 1] = 1  # positions predicting reply tokens
            prompt_lens[i] = len(prompt)
        return {"teacher_input_ids": ids, "teacher_attention_mask": att,
                "teacher_loss_mask": tmask,
                "teacher_loss_positions": reply_positions(b, prompt_lens, self.target_len, t)}

    def _units(self, records, replies) -> Dict[str, np.ndarray]:
        sd = self.model.speech_decoder
        b, r_len, u_len = len(records), self.target_len, self.units_len
        text_ids = np.zeros((b, r_len), np.int32)
        unit_ids = np.zeros((b, u_len), np.int32)
        text_lengths, unit_lengths, chunk_ends = [], [], []
        for i, (rec, r) in enumerate(zip(records, replies)):
            if rec is None:
                text_lengths.append(0)
                unit_lengths.append(0)
                chunk_ends.append(None)
                continue
            if rec.get("units") is None:
                raise ValueError(f"record {rec.get('id', '?')}: stage 3 needs 'units'")
            # The speech decoder reads the reply text tokens (EOS excluded) and their states.
            text = [x for x in r if x != self.tok.eos_id]
            units = [int(u) for u in rec["units"]][:u_len]
            bad = [u for u in units if not 0 <= u < sd.unit_vocab_size]
            if bad:
                raise ValueError(f"record {rec.get('id', '?')}: unit ids {bad[:5]} outside "
                                 f"[0, {sd.unit_vocab_size})")
            text_ids[i, :len(text)] = text
            unit_ids[i, :len(units)] = units
            text_lengths.append(len(text))
            unit_lengths.append(len(units))
            chunk_ends.append(self._chunk_ends(rec, len(text), sd.stream_n))
        seq = streaming.layout_length(r_len, u_len, sd.max_length)
        layout = streaming.build_layout(text_lengths, unit_lengths, sd.stream_n, sd.stream_m,
                                        sd.max_length, seq_len=seq, chunk_ends=chunk_ends)
        out = {"reply_start": np.full((b,), len(self.prompt), np.int32),
               "text_ids": text_ids, "unit_ids": unit_ids}
        out.update(streaming.layout_to_batch(layout))
        hidden = self._cached_hidden(records, text_lengths)
        if hidden is not None:
            out["llm_hidden_prev"] = hidden
        return out

    def _chunk_ends(self, rec, num_text: int, n: int) -> Optional[List[int]]:
        """The aligned chunks' unit ends of a record (None: fixed chunks)."""
        ends = rec.get("token_unit_ends")
        if self.unit_chunks == "fixed" or ends is None:
            return None
        if len(ends) < num_text:
            raise ValueError(f"record {rec.get('id', '?')}: token_unit_ends has {len(ends)} "
                             f"entries for a reply of {num_text} tokens")
        return streaming.chunk_ends_from_tokens(ends[:num_text], n)

    def _cached_hidden(self, records, text_lengths) -> Optional[np.ndarray]:
        """[B, target_len, H] frozen-LLM states h_{t-1} of each reply token, when every
        record carries them (`llm_hidden_prev`, cached once): stage 3 then never runs the
        LLM. None when no record has them; ValueError when only some do."""
        real = [r for r in records if r is not None]
        have = [r.get("llm_hidden_prev") is not None for r in real]
        if not any(have):
            return None
        if not all(have):
            missing = [r.get("id", "?") for r in real if r.get("llm_hidden_prev") is None]
            raise ValueError(f"records {missing[:5]} lack llm_hidden_prev while others in "
                             "the batch carry it: cache it for every stage-3 record")
        width = np.asarray(real[0]["llm_hidden_prev"]).shape[-1]
        out = np.zeros((len(records), self.target_len, width), np.float32)
        for i, (rec, n) in enumerate(zip(records, text_lengths)):
            if rec is None:
                continue
            h = np.asarray(rec["llm_hidden_prev"], np.float32)
            if h.ndim != 2 or h.shape[1] != width or h.shape[0] < n:
                raise ValueError(f"record {rec.get('id', '?')}: llm_hidden_prev has shape "
                                 f"{h.shape}, need [>= {n} reply tokens, {width}]")
            out[i, :n] = h[:n]
        return out

    def tokens_per_row(self) -> int:
        """Sequence positions the LLM processes per row (for tokens/s)."""
        n = self.seq_len
        if self.objective == "distill_kl":
            n += _round_up(self.teacher_len + self.target_len, 8)
        return n


def reply_positions(batch: int, prompt_len, reply_len: int, seq_len: Optional[int] = None
                    ) -> np.ndarray:
    """`loss_positions` [B, R]: the positions predicting a reply of up to R tokens that
    follows a prompt of `prompt_len` tokens (an int, or one per row), clipped to `seq_len`."""
    start = np.broadcast_to(np.asarray(prompt_len, np.int32), (batch,)) - 1
    pos = start[:, None] + np.arange(reply_len, dtype=np.int32)[None, :]
    return pos if seq_len is None else np.minimum(pos, seq_len - 1).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Sources


class MemorySource:
    """Endless, seeded, epoch-shuffled batches of records held in memory.

    Each epoch is a fresh permutation of `seed` and the epoch number; the state is just
    (epoch, position), so a restored source continues with exactly the batches an
    uninterrupted run would have seen. `drop_remainder`: a batch never straddles epochs.
    """

    def __init__(self, records: Sequence[Mapping], batch_size: int, seed: int = 0,
                 shuffle: bool = True):
        if not records:
            raise ValueError("MemorySource: no records")
        if batch_size < 1:
            raise ValueError(f"MemorySource: batch_size must be >= 1, got {batch_size}")
        self.records, self.batch_size = list(records), batch_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> np.ndarray:
        n = len(self.records)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def __iter__(self):
        return self

    def __next__(self) -> List[Mapping]:
        n = len(self.records)
        if self.batch_size <= n and self.position + self.batch_size > n:
            self._next_epoch()
        out: List[Mapping] = []
        while len(out) < self.batch_size:  # loops only when batch_size > n
            if self.position >= n:
                self._next_epoch()
            take = min(self.batch_size - len(out), n - self.position)
            out += [self.records[j] for j in self._order[self.position:self.position + take]]
            self.position += take
        return out

    def _next_epoch(self):
        self.epoch += 1
        self.position = 0
        self._order = self._perm(self.epoch)

    def get_state(self) -> dict:
        return {"epoch": int(self.epoch), "position": int(self.position), "seed": self.seed,
                "num_records": len(self.records)}

    def set_state(self, state: Mapping) -> None:
        if int(state["num_records"]) != len(self.records) or int(state["seed"]) != self.seed:
            raise ValueError(f"data state {dict(state)} was saved for another source "
                             f"({len(self.records)} records, seed {self.seed})")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._perm(self.epoch)


class MixedSource:
    """Stage 2b batches: `share` of each batch from source `a` (2a rows), the rest from `b`."""

    def __init__(self, a: MemorySource, b: MemorySource):
        self.a, self.b = a, b
        self.batch_size = a.batch_size + b.batch_size

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.a) + next(self.b)

    def get_state(self) -> dict:
        return {"a": self.a.get_state(), "b": self.b.get_state()}

    def set_state(self, state: Mapping) -> None:
        self.a.set_state(state["a"])
        self.b.set_state(state["b"])


def eval_batches(records: Sequence[Mapping], batch_size: int, max_batches: Optional[int] = None
                 ) -> List[List[Optional[Mapping]]]:
    """Held-out records in order, in batches padded with None rows (masked out)."""
    out = []
    for i in range(0, len(records), batch_size):
        chunk: List[Optional[Mapping]] = list(records[i:i + batch_size])
        chunk += [None] * (batch_size - len(chunk))
        out.append(chunk)
        if max_batches is not None and len(out) >= max_batches:
            break
    return out


def host_slice(rows: Sequence[Any], process_index: int, process_count: int) -> List[Any]:
    """This host's contiguous share of a global batch (batch sharding is block-contiguous)."""
    if len(rows) % process_count:
        raise ValueError(f"global batch {len(rows)} does not split over {process_count} hosts")
    n = len(rows) // process_count
    return list(rows[process_index * n:(process_index + 1) * n])

