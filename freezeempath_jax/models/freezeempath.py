"""The composite FreezeEmpath model; reads like the data-flow diagram of DESIGN.md section 1.

    mel -> whisper -> (last state -> projector -> speech embeds [B, S, H])
                      (all block states -> emotion extractor -> emotion embed [B, Q, H] + SER)
    prompt ids with S speech and Q emotion placeholders -> spliced embeddings -> frozen LLM
    -> logits + last hidden states (-> speech decoder, trained separately in stage 3)
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from freezeempath_jax.models.adapters import make_projector
from freezeempath_jax.models.causal_lm import CausalLM
from freezeempath_jax.models.configs import FreezeEmpathConfig, to_dtype
from freezeempath_jax.models.emotion import EmotionExtractor
from freezeempath_jax.models.speech_decoder import SpeechDecoder
from freezeempath_jax.models.whisper import WhisperEncoder


@struct.dataclass
class SpeechFeatures:
    speech_embeds: jax.Array  # [B, S, H]
    emotion_embedding: jax.Array  # [B, Q, H]
    ser_logits: jax.Array  # [B, num_classes]
    attributes: Optional[jax.Array] = None  # [B, A] (RE-LLM dimensional attributes) or None
    cue_logits: Optional[dict] = None  # {"gender": [B, 2], "age": [B, 3]} or None
    # [B, S] bool, with `projector.snap_compact`: which speech positions the LLM reads (the
    # kept ones are the last of each row); None: all of them.
    speech_mask: Optional[jax.Array] = None
    # [B, S] int, with `projector.snap_to_vocab`: the token each speech position was snapped to
    # (in the order of `speech_embeds`), so what the LLM read is known without a second search
    speech_ids: Optional[jax.Array] = None
    # [B, Q] bool, with `emotion.snap_phrases`: which emotion slots hold the recognised
    # class's phrase (the kept ones are the last of each row); None: all of them.
    emotion_mask: Optional[jax.Array] = None


@struct.dataclass
class FreezeEmpathOutput:
    logits: Optional[jax.Array]  # [B, T, V] float32
    hidden_states: jax.Array  # [B, T, H] last LLM layer (after final norm)
    emotion_embedding: jax.Array  # [B, Q, H]
    ser_logits: jax.Array  # [B, num_classes]
    attributes: Optional[jax.Array] = None
    cache: Optional[dict] = None
    cue_logits: Optional[dict] = None


def splice(embeds, input_ids, token_id: int, values):
    """Writes `values [B, S, H]` over the positions of `token_id` in `input_ids`, in order.

    Static shapes: the k-th placeholder of a row takes values[:, k] via a cumulative count, so
    no per-example Python loop and no data-dependent shapes. Rows with more placeholders than
    S reuse the last value; the prompt builder guarantees exactly S.
    """
    is_tok = input_ids == token_id
    idx = jnp.clip(jnp.cumsum(is_tok, axis=1) - 1, 0, values.shape[1] - 1)
    gathered = jnp.take_along_axis(values.astype(embeds.dtype), idx[..., None], axis=1)
    return jnp.where(is_tok[..., None], gathered, embeds)


def nearest_tokens(speech, table, vocab=(), with_ratio: bool = False):
    """Ids [B, S] of the rows of the embedding table [V, H] nearest (squared distance) to
    each speech embedding [B, S, H], among the ids `vocab` when given (else all rows). With
    `with_ratio`, also each position's nearest / second-nearest squared distance [B, S]."""
    h = speech.astype(jnp.float32)
    ids = jnp.asarray(vocab, jnp.int32) if len(vocab) else None
    e = (table if ids is None else jnp.take(table, ids, axis=0)).astype(jnp.float32)
    score = 2.0 * jnp.einsum("bsh,vh->bsv", h, e) - jnp.sum(e * e, axis=-1)
    top, best = jax.lax.top_k(score, 2)
    best = best[..., 0] if ids is None else jnp.take(ids, best[..., 0])
    if not with_ratio:
        return best
    norm = jnp.sum(h * h, axis=-1)  # distance = |h|^2 - score
    ratio = (norm - top[..., 0]) / jnp.maximum(norm - top[..., 1], 1e-12)
    return best, ratio


def snap_to_vocab(speech, table, ids=None):
    """Each speech embedding [B, S, H] replaced by its nearest row of the embedding table
    [V, H] (`ids` when already known), with a straight-through gradient (the backward pass
    sees the identity), so the frozen LLM reads only embeddings it was trained on."""
    ids = nearest_tokens(speech, table) if ids is None else ids
    h = speech.astype(jnp.float32)
    nearest = jnp.take(table.astype(jnp.float32), ids, axis=0)
    return (h + jax.lax.stop_gradient(nearest - h)).astype(speech.dtype)


def compact_tokens(speech, ids, silence_id: int = -1, sure=None):
    """Snapped speech [B, S, H] read as text. A position is valid when its token `ids`
    [B, S] is not `silence_id` and it is `sure` ([B, S] bool, when given); a valid position
    is kept when its token differs from the last valid one before it (a word spread over
    several positions, or split by a short pause, is read once). Returns (speech [B, S, H],
    ids [B, S], mask [B, S] bool) with each row's kept positions moved, in order, to its end
    (static shapes: a running max and a stable sort, no data-dependent length)."""
    valid = ids != silence_id
    if sure is not None:
        valid = valid & sure
    pos = jnp.arange(ids.shape[1])
    last = jax.lax.cummax(jnp.where(valid, pos, -1), axis=1)  # last valid position so far
    before = jnp.pad(last[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    prev = jnp.where(before >= 0, jnp.take_along_axis(ids, jnp.maximum(before, 0), axis=1), -1)
    keep = valid & (ids != prev)
    order = jnp.argsort(keep, axis=1, stable=True)  # dropped first, kept last, each in order
    return (jnp.take_along_axis(speech, order[..., None], axis=1),
            jnp.take_along_axis(ids, order, axis=1), jnp.take_along_axis(keep, order, axis=1))


def placeholder_attention_mask(input_ids, attention_mask, token_id: int, keep):
    """`attention_mask` [B, T] with the k-th slot of placeholder `token_id` set from
    `keep[:, k]` ([B, N] bool): dropped positions (speech dropped by compaction, emotion slots
    a snapped phrase leaves empty) become holes; positions count real slots only, so the kept
    ones read as contiguous text."""
    base = (jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None
            else attention_mask.astype(jnp.int32))
    is_tok = input_ids == token_id
    idx = jnp.clip(jnp.cumsum(is_tok, axis=1) - 1, 0, keep.shape[1] - 1)
    kept = jnp.take_along_axis(keep.astype(jnp.int32), idx, axis=1)
    return jnp.where(is_tok, base * kept, base)


def phrase_table(phrases):
    """(ids [C, Q] int32, keep [C, Q] bool) of per-class token phrases, each right-aligned in
    Q = the longest phrase's length (at least 1) slots, so kept slots come last as with
    compacted speech."""
    q = max([1] + [len(p) for p in phrases])
    ids = np.zeros((len(phrases), q), np.int32)
    keep = np.zeros((len(phrases), q), bool)
    for c, p in enumerate(phrases):
        if len(p):
            ids[c, q - len(p):], keep[c, q - len(p):] = p, True
    return ids, keep


def snap_emotion(ser_logits, table, phrases):
    """The recognised emotion read as words (`emotion.snap_phrases`): each row's embeddings
    [B, Q, H] are the token embeddings of its SER argmax class's phrase (zeros in the holes),
    and keep [B, Q] bool marks the phrase's slots. A discrete choice: no gradient flows back
    (the SER head learns from its own CE; a straight-through estimate through the LLM's loss
    was measured to undo it, README)."""
    ids, keep = phrase_table(phrases)
    words = jnp.take(table.astype(jnp.float32), jnp.asarray(ids), axis=0)
    words = words * jnp.asarray(keep, jnp.float32)[..., None]  # [C, Q, H]
    cls = jax.lax.stop_gradient(jnp.argmax(ser_logits, axis=-1))
    return (jax.lax.stop_gradient(jnp.take(words, cls, axis=0)),
            jnp.take(jnp.asarray(keep), cls, axis=0))


class FreezeEmpath(nn.Module):
    """Whisper encoder + speech adapter + emotion extractor/SER head + frozen LLM
    (+ speech decoder). Parameter tree: whisper / projector / emotion / llm / speech_decoder.
    """

    config: FreezeEmpathConfig

    def setup(self):
        c = self.config
        self.whisper = WhisperEncoder(c.whisper)
        self.projector = make_projector(c.projector, c.llm.hidden_size, c.dtype)
        self.emotion = EmotionExtractor(c.emotion, c.llm.hidden_size, c.dtype)
        self.llm = CausalLM(c.llm)
        if c.speech_decoder is not None:
            self.speech_decoder = SpeechDecoder(c.speech_decoder, c.llm.hidden_size)

    def encode_audio(self, mel):
        """Frozen Whisper pass: (last_hidden_state [B, T, d], layer_states [L, B, T, d]).

        Gradients never flow into the frozen encoder, so the backward pass skips it.
        """
        out = self.whisper(mel)
        return (jax.lax.stop_gradient(out.last_hidden_state),
                jax.lax.stop_gradient(out.layer_states))

    def features_from_states(self, last_hidden_state, layer_states) -> SpeechFeatures:
        """Adapters on (possibly cached) encoder outputs (speech embeddings snapped to the
        LLM's token embeddings when `projector.snap_to_vocab`)."""
        p = self.config.projector
        speech, speech_mask, ids = self.projector(last_hidden_state), None, None
        if p.snap_to_vocab:
            table = self.llm.embed_tokens.embedding
            sure = None
            if p.snap_compact and p.snap_ambiguity < 1.0:  # the ratio only where it is used
                ids, ratio = nearest_tokens(speech, table, p.snap_vocab, with_ratio=True)
                sure = ratio <= p.snap_ambiguity
            else:
                ids = nearest_tokens(speech, table, p.snap_vocab)
            speech = snap_to_vocab(speech, table, ids)
            if p.snap_compact:
                speech, ids, speech_mask = compact_tokens(speech, ids, p.snap_silence_id, sure)
        emo = self.emotion(layer_states)
        embedding, emotion_mask = emo.embedding, None
        e = self.config.emotion
        if e.snap_phrases:
            if len(e.snap_phrases) != e.num_classes or e.splice_cues:
                raise ValueError(
                    f"emotion.snap_phrases holds {len(e.snap_phrases)} phrases for "
                    f"{e.num_classes} classes (one per class, and not with splice_cues)")
            embedding, emotion_mask = snap_emotion(emo.ser_logits,
                                                   self.llm.embed_tokens.embedding,
                                                   e.snap_phrases)
            embedding = embedding.astype(emo.embedding.dtype)
        return SpeechFeatures(speech_embeds=speech, emotion_embedding=embedding,
                              ser_logits=emo.ser_logits, attributes=emo.attributes,
                              cue_logits=emo.cue_logits, speech_mask=speech_mask,
                              speech_ids=ids, emotion_mask=emotion_mask)

    def project_speech(self, last_hidden_state):
        """The projector alone: speech embeddings [B, S, H] of (cached) encoder outputs, never
        snapped (the alignment warm-ups train the continuous output)."""
        return self.projector(last_hidden_state)

    def encode_speech(self, mel):
        """mel [B, n_mels, frames] -> (speech_embeds [B, S, H], emotion_embedding [B, Q, H],
        ser_logits [B, 5])."""
        f = self.features_from_states(*self.encode_audio(mel))
        return f.speech_embeds, f.emotion_embedding, f.ser_logits

    def encode_features(self, mel) -> SpeechFeatures:
        """mel [B, n_mels, frames] -> every head's output (`SpeechFeatures`, with the
        paralinguistic heads' logits when the config enables them)."""
        return self.features_from_states(*self.encode_audio(mel))

    def prompt_embeds(self, input_ids, features: SpeechFeatures):
        """LLM input embeddings of a prompt with the speech and emotion placeholders filled."""
        c = self.config
        # Placeholder ids may lie outside the LLM vocabulary (added tokens): embed a harmless id
        # there, it is overwritten anyway.
        holder = (input_ids == c.speech_token_id) | (input_ids == c.emotion_token_id)
        emb = self.llm.embed(jnp.where(holder, 0, input_ids))
        emb = splice(emb, input_ids, c.speech_token_id, features.speech_embeds)
        return splice(emb, input_ids, c.emotion_token_id, features.emotion_embedding)

    def __call__(self, mel=None, input_ids=None, attention_mask=None, positions=None, cache=None,
                 encoder_states=None, last_logits_only: bool = False,
                 return_logits: bool = True) -> FreezeEmpathOutput:
        """Full turn forward. Pass `mel`, or `encoder_states=(last, layers)` from a cache of the
        frozen encoder's outputs (training with cached encoder passes)."""
        if encoder_states is None:
            if mel is None:
                raise ValueError("pass mel or encoder_states")
            encoder_states = self.encode_audio(mel)
        feats = self.features_from_states(*encoder_states)
        embeds = self.prompt_embeds(input_ids, feats)
        holes = [(self.config.speech_token_id, feats.speech_mask, "projector.snap_compact"),
                 (self.config.emotion_token_id, feats.emotion_mask, "emotion.snap_phrases")]
        for token_id, keep, option in holes:
            if keep is None:
                continue
            if cache is not None:  # the mask would cover cache slots, not these tokens
                raise ValueError(f"{option}: prefill without a cache (chat passes only the "
                                 "kept positions)")
            attention_mask = placeholder_attention_mask(input_ids, attention_mask, token_id,
                                                        keep)
        out = self.llm(inputs_embeds=embeds.astype(to_dtype(self.config.llm.dtype)),
                       positions=positions, attention_mask=attention_mask, cache=cache,
                       last_logits_only=last_logits_only, return_logits=return_logits)
        if self.is_initializing() and self.config.speech_decoder is not None:
            # `init` must create every part's parameters; the speech decoder is otherwise only
            # reached through its own methods (stage 3, unit generation).
            self.speech_decoder(self.speech_decoder.fuse(out.hidden_states, input_ids))
        return FreezeEmpathOutput(logits=out.logits, hidden_states=out.hidden_states,
                                  emotion_embedding=feats.emotion_embedding,
                                  ser_logits=feats.ser_logits, attributes=feats.attributes,
                                  cache=out.cache, cue_logits=feats.cue_logits)

    def llm_logits(self, hidden):
        """The frozen LLM's output head on final hidden states [B, R, H] -> float32 logits
        (training computes logits only where a loss is taken)."""
        return self.llm.logits(hidden)

    def llm_forward(self, **kwargs):
        """The bare frozen LLM (text-only teacher passes, generation steps)."""
        return self.llm(**kwargs)

    def speech_decoder_forward(self, *args, **kwargs):
        """The speech decoder (stage 3 training, unit generation)."""
        return self.speech_decoder(*args, **kwargs)
