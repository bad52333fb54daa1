"""Training objectives as pure functions of model outputs and batch arrays.

Conventions (every batch array has the batch on axis 0):
- Next-token targets are *aligned with the input positions*: `targets[b, t]` is the token
  position t must predict (usually `input_ids[b, t + 1]`) and `loss_mask[b, t]` is 1 where that
  prediction is trained (reply tokens only). `next_token_targets` builds both.
- Every loss is a normalised sum: `sum(per-item loss) / denominator`. The denominators
  (`norm`, e.g. {"tokens": ..., "ser_examples": ...}) default to this batch's counts, giving
  plain means. The train step passes the counts of the *whole* batch to each microbatch, so
  the sum over microbatches equals the full-batch loss exactly.
- Each function returns `(loss, sums)`: `sums` holds additive statistics (loss sums, correct
  counts, item counts) that can be added over microbatches and turned into metrics by
  `finalize_metrics`.

Batch keys read here:
  stage 1 (`distill_ce`): targets [B, T] int, loss_mask [B, T].
  stage 1 KL (`distill_kl`): loss_mask [B, T] (student positions predicting reply tokens),
      teacher_loss_mask [B, T'] (teacher positions predicting the same reply tokens, in order),
      targets (only when ce_weight > 0).
  stage 2a/2b (`emotion_ce`): targets, loss_mask, emotion_label [B] int (-1: no label, e.g.
      2b rows), optional attributes [B, A] float and attr_mask [B], optional paralinguistic
      labels `<cue>_label` [B] int (-1: no label; cue in "gender", "age").
  stage 3 (`unit_ce`): unit targets [B, S] and loss mask [B, S] from the streaming layout.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

Sums = Dict[str, jax.Array]

# The objective each stage trains by default, and every objective the train step knows.
STAGE_OBJECTIVES = {"1": "distill_ce", "2a": "emotion_ce", "2b": "emotion_ce",
                    "3a": "unit_ce", "3b": "unit_ce"}
# Paralinguistic heads (OSUM-EChat recipe): batch key `<name>_label`, metrics `<name>_accuracy`.
CUE_NAMES = ("gender", "age")
OBJECTIVES = ("distill_ce", "distill_kl", "emotion_ce", "ser_ce", "unit_ce", "align_ctc",
              "align_words")


def next_token_targets(input_ids, target_mask):
    """(targets, loss_mask) aligned with input positions from ids [B, T] and a mask [B, T] of
    the tokens to be predicted (1 on reply tokens): position t predicts token t + 1."""
    input_ids = jnp.asarray(input_ids)
    target_mask = jnp.asarray(target_mask)
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    loss_mask = jnp.concatenate([target_mask[:, 1:], jnp.zeros_like(target_mask[:, :1])], axis=1)
    return targets, loss_mask.astype(jnp.float32)


def _denominator(norm: Optional[Mapping], key: str, count):
    n = count if norm is None or key not in norm else norm[key]
    return jnp.maximum(jnp.asarray(n, jnp.float32), 1.0)


def token_ce_sums(logits, targets, mask) -> Sums:
    """Summed next-token cross-entropy (float32) and greedy-correct count over `mask`."""
    logits = logits.astype(jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    # Masked positions may hold ids outside the vocabulary (the <speech>/<emotion> placeholders
    # are added tokens): an out-of-range gather yields NaN, and NaN * 0 is NaN, so such
    # positions are both clipped into range and selected away with `where`.
    safe = jnp.clip(targets.astype(jnp.int32), 0, logits.shape[-1] - 1)
    gold = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    ce = jnp.where(mask > 0, logz - gold, 0.0)
    return {"ce_sum": jnp.sum(ce * mask), "token_correct": jnp.sum(correct * mask),
            "tokens": jnp.sum(mask)}


def classification_sums(logits, labels) -> Sums:
    """Summed CE and correct count over rows with `labels >= 0` (-1 marks "no label")."""
    logits = logits.astype(jnp.float32)
    valid = (labels >= 0).astype(jnp.float32)
    safe = jnp.where(labels >= 0, labels, 0).astype(jnp.int32)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, safe[:, None], -1)[:, 0]
    correct = (jnp.argmax(logits, -1) == safe).astype(jnp.float32)
    return {"ser_sum": jnp.sum(nll * valid), "ser_correct": jnp.sum(correct * valid),
            "ser_examples": jnp.sum(valid)}


def mse_sums(pred, target, mask=None) -> Sums:
    """Summed per-row mean squared error over the attribute dimension (rows where mask=1)."""
    pred, target = pred.astype(jnp.float32), jnp.asarray(target, jnp.float32)
    m = jnp.ones(pred.shape[:1], jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    per_row = jnp.mean(jnp.square(pred - target), axis=-1)
    return {"attr_sum": jnp.sum(per_row * m), "attr_examples": jnp.sum(m)}


def _rank_positions(mask):
    """For a 0/1 mask [B, T]: rank [B, T] of each marked position among the marked ones (0-based)
    and, for every rank k, the position holding it: where [B, T] (searchsorted on the cumsum)."""
    cs = jnp.cumsum(mask.astype(jnp.int32), axis=1)
    rank = cs - 1
    ks = jnp.arange(1, mask.shape[1] + 1)
    where = jax.vmap(lambda c: jnp.searchsorted(c, ks, side="left"))(cs)
    return rank, where, cs[:, -1]


def kl_sums(student_logits, student_mask, teacher_logits, teacher_mask,
            temperature: float = 1.0) -> Sums:
    """Summed KL(teacher || student) over aligned reply positions.

    The k-th marked student position is compared with the k-th marked teacher position (the
    same reply token seen after a speech prompt and after a transcript prompt); ranks beyond
    the shorter of the two counts are ignored. Distributions are softmax(logits / temperature);
    the sum is scaled by temperature**2 so gradients keep their size across temperatures.
    """
    s_mask = jnp.asarray(student_mask) > 0
    s_rank, _, _ = _rank_positions(s_mask)
    _, t_where, t_count = _rank_positions(jnp.asarray(teacher_mask) > 0)
    tt = teacher_logits.shape[1]
    # Teacher position holding the same rank as each student position.
    t_pos = jnp.take_along_axis(t_where, jnp.clip(s_rank, 0, tt - 1), axis=1)
    valid = s_mask & (s_rank < t_count[:, None])
    t_pos = jnp.clip(jnp.where(valid, t_pos, 0), 0, tt - 1)
    t_logits = jnp.take_along_axis(teacher_logits, t_pos[..., None], axis=1)
    inv_t = 1.0 / temperature
    log_p_t = jax.nn.log_softmax(t_logits.astype(jnp.float32) * inv_t, axis=-1)
    log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) * inv_t, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1) * temperature ** 2
    v = valid.astype(jnp.float32)
    return {"kl_sum": jnp.sum(kl * v), "kl_tokens": jnp.sum(v)}


def distill_ce(logits, batch, norm: Optional[Mapping] = None) -> Tuple[jax.Array, Sums]:
    """Stage 1: CE of the frozen LLM (fed the spliced speech prompt) on the teacher's reply
    tokens (the frozen LLM's own reply to the transcript); mean over reply tokens."""
    s = token_ce_sums(logits, batch["targets"], batch["loss_mask"])
    return s["ce_sum"] / _denominator(norm, "tokens", s["tokens"]), s


def distill_kl(student_logits, teacher_logits, batch, norm: Optional[Mapping] = None,
               temperature: float = 1.0, ce_weight: float = 0.0) -> Tuple[jax.Array, Sums]:
    """Stage 1, KL variant: KL(teacher || student) per reply token, where the teacher is the same
    frozen LLM reading the transcript prompt + reply (pass its logits under stop_gradient),
    plus `ce_weight` x the CE of `distill_ce`."""
    s = kl_sums(student_logits, batch["loss_mask"], jax.lax.stop_gradient(teacher_logits),
                batch["teacher_loss_mask"], temperature)
    loss = s["kl_sum"] / _denominator(norm, "kl_tokens", s["kl_tokens"])
    if ce_weight:
        ce = token_ce_sums(student_logits, batch["targets"], batch["loss_mask"])
        s.update(ce)
        loss = loss + ce_weight * ce["ce_sum"] / _denominator(norm, "tokens", ce["tokens"])
    return loss, s


def _with_attributes(loss, s, attributes, batch, norm, attr_weight: float):
    """Adds `attr_weight` x MSE on arousal/valence/dominance (RE-LLM recipe) when asked."""
    if attr_weight:
        if attributes is None or "attributes" not in batch:
            raise ValueError("attr_weight > 0 needs an attribute head (EmotionConfig."
                             "num_attributes > 0) and batch['attributes']")
        a = mse_sums(attributes, batch["attributes"], batch.get("attr_mask"))
        s.update(a)
        loss = loss + attr_weight * a["attr_sum"] / _denominator(
            norm, "attr_examples", a["attr_examples"])
    return loss, s


def emotion_word_sums(emotion_embedding, embed_table, labels, word_ids) -> Sums:
    """The emotion embedding [B, Q, H] against the frozen LLM's input embedding of a word for
    the row's emotion (`word_ids[label]`, e.g. " sad"): squared error over the mean squared
    norm of the word embeddings (scale-free), summed over labelled rows (label -1 counts
    nowhere), and whether the nearest of the words is the right one."""
    words = jnp.take(embed_table, jnp.asarray(word_ids, jnp.int32), axis=0).astype(jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    valid = (labels >= 0).astype(jnp.float32)
    e = emotion_embedding.astype(jnp.float32)  # [B, Q, H]
    target = jnp.take(words, jnp.maximum(labels, 0), axis=0)[:, None]
    scale = jnp.mean(jnp.sum(words * words, axis=-1))
    err = jnp.mean(jnp.sum((e - target) ** 2, axis=-1), axis=-1) / scale  # [B]
    dist = jnp.sum((e[:, :, None] - words[None, None]) ** 2, axis=-1).mean(1)  # [B, K]
    hit = (jnp.argmin(dist, axis=-1) == labels).astype(jnp.float32)
    return {"emotion_word_sum": jnp.sum(err * valid),
            "emotion_word_correct": jnp.sum(hit * valid),
            "emotion_word_examples": jnp.sum(valid)}


def with_emotion_words(loss, s, emotion_embedding, embed_table, batch, norm,
                       weight: float, word_ids):
    """Adds `weight` x `emotion_word_sums` (the demo's emotion-word warm-up: the frozen LLM
    then reads the emotion embedding much as the word, e.g. "(I feel <emotion>.)")."""
    if not weight:
        return loss, s
    if len(word_ids) == 0 or "emotion_label" not in batch:
        raise ValueError("emotion_word_weight > 0 needs loss.emotion_word_ids (one token per "
                         "emotion) and emotion-labelled clips")
    w = emotion_word_sums(emotion_embedding, embed_table, batch["emotion_label"], word_ids)
    s = dict(s, **w)
    return loss + weight * w["emotion_word_sum"] / _denominator(
        norm, "emotion_word_examples", w["emotion_word_examples"]), s


def cue_sums(name: str, logits, labels) -> Sums:
    """`classification_sums` of one paralinguistic head, keyed `<name>_sum / _correct /
    _examples` (rows with label -1 count nowhere)."""
    s = classification_sums(logits, labels)
    return {f"{name}_sum": s["ser_sum"], f"{name}_correct": s["ser_correct"],
            f"{name}_examples": s["ser_examples"]}


def _with_cues(loss, s, cue_logits, batch, norm, cue_weights: Optional[Mapping[str, float]]):
    """Adds each paralinguistic head's CE (OSUM-EChat recipe) times its weight; heads whose
    labels are in the batch are always measured (accuracy), weight 0 or not."""
    cue_weights = dict(cue_weights or {})
    for name, weight in cue_weights.items():
        if weight and (cue_logits is None or name not in cue_logits):
            raise ValueError(f"{name}_weight > 0 needs a {name} head (EmotionConfig."
                             f"num_{'genders' if name == 'gender' else 'age_groups'} > 0)")
        if weight and f"{name}_label" not in batch:
            raise ValueError(f"{name}_weight > 0 needs batch['{name}_label']")
    for name, logits in (cue_logits or {}).items():
        if f"{name}_label" not in batch:
            continue
        c = cue_sums(name, logits, batch[f"{name}_label"])
        s.update(c)
        if cue_weights.get(name):
            loss = loss + cue_weights[name] * c[f"{name}_sum"] / _denominator(
                norm, f"{name}_examples", c[f"{name}_examples"])
    return loss, s


def emotion_ce(logits, ser_logits, batch, attributes=None, norm: Optional[Mapping] = None,
               ser_weight: float = 0.8, attr_weight: float = 0.0, cue_logits=None,
               cue_weights: Optional[Mapping[str, float]] = None) -> Tuple[jax.Array, Sums]:
    """Stages 2a/2b (and BLSP-Emo's emotion-aware continuation): CE on the LLM's reply tokens
    (naming the emotion in 2a, the empathetic reply in 2b) + `ser_weight` x SER-head CE over
    labelled rows + `attr_weight` x MSE on arousal/valence/dominance (RE-LLM recipe) +
    `cue_weights[name]` x CE of each paralinguistic head (OSUM-EChat recipe)."""
    s = token_ce_sums(logits, batch["targets"], batch["loss_mask"])
    loss = s["ce_sum"] / _denominator(norm, "tokens", s["tokens"])
    if "emotion_label" in batch:
        ser = classification_sums(ser_logits, batch["emotion_label"])
        s.update(ser)
        if ser_weight:
            loss = loss + ser_weight * ser["ser_sum"] / _denominator(
                norm, "ser_examples", ser["ser_examples"])
    loss, s = _with_attributes(loss, s, attributes, batch, norm, attr_weight)
    return _with_cues(loss, s, cue_logits, batch, norm, cue_weights)


def ser_ce(ser_logits, batch, attributes=None, norm: Optional[Mapping] = None,
           attr_weight: float = 0.0, cue_logits=None,
           cue_weights: Optional[Mapping[str, float]] = None) -> Tuple[jax.Array, Sums]:
    """SER-head CE over labelled rows (+ `attr_weight` x attribute MSE, + each
    paralinguistic head's CE x its weight), no LLM pass: a cheap warm-up of the emotion
    extractor on emotion-recognition data before stage 2a (the CPU demo's recipe; the
    LLM-facing MLP gets no gradient here)."""
    if "emotion_label" not in batch:
        raise ValueError("objective ser_ce needs batch['emotion_label'] (emotion-labelled clips)")
    s = classification_sums(ser_logits, batch["emotion_label"])
    loss = s["ser_sum"] / _denominator(norm, "ser_examples", s["ser_examples"])
    loss, s = _with_attributes(loss, s, attributes, batch, norm, attr_weight)
    return _with_cues(loss, s, cue_logits, batch, norm, cue_weights)


def align_ctc(speech_embeds, embed_table, batch, norm: Optional[Mapping] = None, *,
              blank_logit: float = -2.0, temperature: float = 1.0) -> Tuple[jax.Array, Sums]:
    """Content alignment without the LLM: CTC of the speech embeddings [B, S, H] against the
    transcript's token ids, scored through the frozen LLM's own input embedding table [V, H].

    A speech position's logit for token v is `-||speech - E_v||^2 / temperature`: the loss pulls positions
    onto the embeddings of the transcript's tokens, in order, so the frozen LLM reads the
    speech much as it would read the transcript. CTC's blank has the constant logit
    `blank_logit` (a position farther than sqrt(-blank_logit) from every token embedding is a
    blank), so the warm-up adds no parameter. Metrics: loss_align and align_recall (share of
    transcript tokens that some position emits under the greedy path).
    Batch: transcript_ids [B, L], transcript_mask [B, L] (1 = token); rows without tokens
    count nowhere. With `align_vocab` [B, K] (every row the same candidate token ids, e.g.
    the corpus's tokens plus sampled negatives) the classes are those K tokens and
    transcript_ids index into them: a vocabulary of 152K tokens is never scored in full.
    """
    import optax

    labels = jnp.asarray(batch["transcript_ids"], jnp.int32)
    lmask = jnp.asarray(batch["transcript_mask"], jnp.float32)
    h = speech_embeds.astype(jnp.float32)
    if "align_vocab" in batch:
        embed_table = jnp.take(embed_table, batch["align_vocab"][0], axis=0)
    e = embed_table.astype(jnp.float32)
    # -||h - e||^2 = 2 h.e - |h|^2 - |e|^2 : one matrix product over the vocabulary
    logits = (2.0 * jnp.einsum("bsh,vh->bsv", h, e) - jnp.sum(h * h, -1, keepdims=True)
              - jnp.sum(e * e, -1)[None, None, :]) / temperature
    blank = jnp.full(logits.shape[:2] + (1,), blank_logit, jnp.float32)
    logits = jnp.concatenate([blank, logits], axis=-1)  # blank is class 0, token v is v + 1
    per_row = optax.ctc_loss(logits, jnp.zeros(logits.shape[:2], jnp.float32), labels + 1,
                             1.0 - lmask, blank_id=0)
    rows = (jnp.sum(lmask, axis=1) > 0).astype(jnp.float32)
    path = jnp.argmax(logits, axis=-1)  # [B, S]
    hit = jnp.any(path[:, None, :] == (labels + 1)[:, :, None], axis=-1).astype(jnp.float32)
    s = {"align_sum": jnp.sum(per_row * rows), "align_examples": jnp.sum(rows),
         "align_hits": jnp.sum(hit * lmask), "align_tokens": jnp.sum(lmask)}
    return s["align_sum"] / _denominator(norm, "align_examples", s["align_examples"]), s


def align_words(speech_embeds, embed_table, batch, norm: Optional[Mapping] = None, *,
                temperature: float = 0.05, mse_weight: float = 1.0
                ) -> Tuple[jax.Array, Sums]:
    """Content alignment without the LLM, from word timings: each speech position [B, S, H]
    is pulled onto the frozen LLM's input embedding of the token spoken at its centre (the
    zero vector where no word is spoken), so the LLM reads the speech as a transcript whose
    tokens repeat for as long as they are spoken.

    Two terms per position, averaged over positions: a classification over the candidates
    (the zero vector, then each candidate token's embedding) with logits
    `-||h - c||^2 / (temperature * S)`, which separates the tokens (a squared error alone
    settles on the mean of the candidates: measured, it learned nothing on the demo corpus),
    plus `mse_weight * ||h - target||^2 / S`, which puts the position on the embedding itself;
    S is the table's mean squared embedding norm, so both are scale-free.

    Batch: position_tokens [B, S] (token id, -1 = no word), position_mask [B, S] (1 = a
    position of a real row); optional align_vocab [B, K] (candidate token ids, every row the
    same; default the whole table). A token outside the candidates gets the squared error
    only. Metrics: loss_align_words, align_accuracy (share of word positions whose nearest
    candidate is the spoken token).
    """
    f32 = jnp.float32
    tok = jnp.asarray(batch["position_tokens"], jnp.int32)
    m = jnp.asarray(batch["position_mask"], f32)
    h = speech_embeds.astype(f32)
    table = embed_table.astype(f32)
    word = tok >= 0
    target = jnp.where(word[..., None], jnp.take(table, jnp.maximum(tok, 0), axis=0), 0.0)
    scale = jax.lax.stop_gradient(jnp.mean(jnp.sum(table * table, axis=-1)))
    err = jnp.sum(jnp.square(h - target), axis=-1) / scale
    if "align_vocab" in batch:
        cand_ids = jnp.asarray(batch["align_vocab"][0], jnp.int32)
    else:
        cand_ids = jnp.arange(table.shape[0], dtype=jnp.int32)
    cand = jnp.concatenate([jnp.zeros((1, table.shape[1]), f32),
                            jnp.take(table, cand_ids, axis=0)])  # class 0: no word
    d2 = (jnp.sum(h * h, -1, keepdims=True) - 2.0 * jnp.einsum("bsh,vh->bsv", h, cand)
          + jnp.sum(cand * cand, -1)[None, None])
    logits = -d2 / (temperature * scale)
    eq = tok[..., None] == cand_ids[None, None]
    known = jnp.any(eq, axis=-1)
    cls = jnp.where(word, jnp.argmax(eq, axis=-1) + 1, 0)
    ce_mask = m * jnp.logical_or(~word, known).astype(f32)
    ce_sum = token_ce_sums(logits, cls, ce_mask)["ce_sum"]
    words = (word & known).astype(f32) * m
    hit = (jnp.argmax(logits, axis=-1) == cls).astype(f32)
    s = {"align_words_sum": mse_weight * jnp.sum(err * m) + ce_sum,
         "align_positions": jnp.sum(m),
         "align_word_hits": jnp.sum(hit * words), "align_word_positions": jnp.sum(words)}
    return s["align_words_sum"] / _denominator(norm, "align_positions",
                                               s["align_positions"]), s


def unit_ce(logits, targets, loss_mask, norm: Optional[Mapping] = None
            ) -> Tuple[jax.Array, Sums]:
    """Stage 3: CE on speech unit / EOS targets of the streaming layout, mean over targets."""
    s = token_ce_sums(logits, targets, loss_mask)
    return s["ce_sum"] / _denominator(norm, "tokens", s["tokens"]), s


def normalizers(batch, objective: str, layout_loss_mask=None) -> Dict[str, jax.Array]:
    """Whole-batch denominators of `objective` ("distill_ce", "distill_kl", "emotion_ce",
    "ser_ce", "unit_ce"), computed from masks alone (no model pass)."""
    f32 = jnp.float32
    if objective == "align_ctc":
        rows = jnp.sum(jnp.asarray(batch["transcript_mask"], f32), axis=1) > 0
        return {"align_examples": jnp.sum(rows.astype(f32))}
    if objective == "align_words":
        return {"align_positions": jnp.sum(jnp.asarray(batch["position_mask"], f32))}
    if objective == "unit_ce":
        m = batch["layout_loss_mask"] if layout_loss_mask is None else layout_loss_mask
        return {"tokens": jnp.sum(jnp.asarray(m, f32))}
    out = {"tokens": jnp.sum(jnp.asarray(batch["loss_mask"], f32))}
    if objective == "distill_kl":
        out["kl_tokens"] = jnp.sum(jnp.minimum(
            jnp.sum(jnp.asarray(batch["loss_mask"]) > 0, axis=1),
            jnp.sum(jnp.asarray(batch["teacher_loss_mask"]) > 0, axis=1)).astype(f32))
    if objective in ("emotion_ce", "ser_ce"):
        if "emotion_label" in batch:
            out["ser_examples"] = jnp.sum((batch["emotion_label"] >= 0).astype(f32))
        for key in batch:
            if key.endswith("_label") and key != "emotion_label":  # paralinguistic heads
                out[f"{key[:-6]}_examples"] = jnp.sum((batch[key] >= 0).astype(f32))
        if "attributes" in batch:
            m = batch.get("attr_mask")
            out["attr_examples"] = (jnp.asarray(batch["attributes"].shape[0], f32) if m is None
                                    else jnp.sum(jnp.asarray(m, f32)))
    return out


def finalize_metrics(sums: Mapping[str, jax.Array]) -> Dict[str, jax.Array]:
    """Metrics from (microbatch-summed) statistics: loss_ce, token_accuracy, num_tokens,
    loss_kl, loss_ser, ser_accuracy, num_ser_examples, loss_attr, loss_<cue>,
    <cue>_accuracy, num_<cue>_examples (only those present)."""
    out = {}

    def ratio(a, b):
        return sums[a] / jnp.maximum(sums[b], 1.0)

    if "ce_sum" in sums:
        out["loss_ce"] = ratio("ce_sum", "tokens")
        out["token_accuracy"] = ratio("token_correct", "tokens")
        out["num_tokens"] = sums["tokens"]
    if "kl_sum" in sums:
        out["loss_kl"] = ratio("kl_sum", "kl_tokens")
    if "ser_sum" in sums:
        out["loss_ser"] = ratio("ser_sum", "ser_examples")
        out["ser_accuracy"] = ratio("ser_correct", "ser_examples")
        out["num_ser_examples"] = sums["ser_examples"]
    if "attr_sum" in sums:
        out["loss_attr"] = ratio("attr_sum", "attr_examples")
    for name in CUE_NAMES:
        if f"{name}_sum" in sums:
            out[f"loss_{name}"] = ratio(f"{name}_sum", f"{name}_examples")
            out[f"{name}_accuracy"] = ratio(f"{name}_correct", f"{name}_examples")
            out[f"num_{name}_examples"] = sums[f"{name}_examples"]
    if "align_sum" in sums:
        out["loss_align"] = ratio("align_sum", "align_examples")
        out["align_recall"] = ratio("align_hits", "align_tokens")
    if "emotion_word_sum" in sums:
        out["loss_emotion_word"] = ratio("emotion_word_sum", "emotion_word_examples")
        out["emotion_word_accuracy"] = ratio("emotion_word_correct", "emotion_word_examples")
    if "align_words_sum" in sums:
        out["loss_align_words"] = ratio("align_words_sum", "align_positions")
        out["align_accuracy"] = ratio("align_word_hits", "align_word_positions")
    return out
