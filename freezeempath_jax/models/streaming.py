"""Streaming (N, M) layout of the speech decoder: which input goes where, for training and for
generation. Pure numpy / jnp, no Flax.

Reading of the release (LLaMA-Omni2's speech generator, which FreezeEmpath reuses):

- Text side: one input per reply text token t (proj(h_{t-1}) fused with embed(token t)), then
  the embedding of `<sep>`. Unit side: the embeddings of the unit tokens, then of EOS.
- Both sides are cut into chunks: text side in chunks of N, unit side in chunks of M (the last
  chunk of each may be short; `<sep>` counts as a text position, EOS as a unit token).
- Fewer unit chunks than text chunks: no interleaving at all, the whole text side then the
  whole unit side.
- Otherwise text chunk i is followed by unit chunk i, except that the *last* text chunk is
  followed by every remaining unit (unit chunks i, i+1, ... merged), so EOS always ends the
  sequence.
- Targets are the unit tokens (EOS included): the position *before* each unit token predicts
  it (a text position for the first unit of a chunk). Text positions and `<sep>` are never
  targets. Sequences longer than `max_length` are cut (the release truncates at 2048).

Worked example, N = 3, M = 5, text t0..t3 (4 tokens), units u0..u6 (7 units):
  text side  [t0 t1 t2] [t3 SEP]             -> 2 chunks
  unit side  [u0 u1 u2 u3 u4] [u5 u6 EOS]    -> 2 chunks, not fewer: interleave
  sequence   t0 t1 t2 u0 u1 u2 u3 u4 t3 SEP u5 u6 EOS
  predicts   .  .  u0 u1 u2 u3 u4 .  .  u5  u6 EOS .      (target of each position)
With only units u0..u2 the unit side [u0 u1 u2 EOS] is 1 chunk < 2, the fallback:
  sequence   t0 t1 t2 t3 SEP u0 u1 u2 EOS
With 6 text tokens the text side is [t0 t1 t2] [t3 t4 t5] [SEP]: the last "chunk" is SEP alone.

Generation mirrors the text-side chunking (`inference_schedule`): after each full chunk of N
text tokens up to M units are sampled (fewer if EOS comes); once the LLM has finished, the
remaining 0..N-1 text tokens and `<sep>` are fed and units are sampled until EOS (at most
`max_units`). This reproduces the training layout exactly whenever no early EOS occurs.

Aligned chunks (`chunk_ends`, an extension; the release trains fixed chunks only). With fixed
chunks the text side runs ahead of the speech by a growing margin (3 tokens of speech last 30-60
units at 50 Hz, not 15), so the decoder has to learn *where* in the text it is speaking, which a
small decoder trained for minutes does not (it loops and babbles; docs/speech_out.md). Given
where each text chunk's speech ends in the target audio (from the TTS's word timings), text
chunk i is followed by exactly the units spoken for its words (at most M); when they are fewer
than M the last of them (or the last text position, when there are none) is trained to predict
EOS, which generation already reads as "this chunk is done" (EOS ends a chunk and is never
fed). The units then always belong to the newest text, as in CosyVoice 2's interleaved
streams. Generation is unchanged; only the training layout and its targets differ:
  N = 3, M = 5, text t0..t3, units u0..u6, chunk 0's speech ends after u1:
  sequence   t0 t1 t2 u0 u1 t3 SEP u2 u3 u4 u5 u6 EOS
  predicts   .  .  u0 u1 EOS .  u2  u3 u4 u5 u6 EOS .
(the EOS target after u1 is `chunk_end`; the sequence stays num_text + num_units + 2 long).

For jit, `build_layout` turns per-example lengths into a static-shape plan on the host; the
model gathers its inputs with it inside jit (`assemble_tokens`, `gather_text`).
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np
from flax import struct

# Kinds of layout positions.
PAD, TEXT, SEP, UNIT, EOS = 0, 1, 2, 3, 4
KIND_NAMES = {PAD: "pad", TEXT: "text", SEP: "sep", UNIT: "unit", EOS: "eos"}


def _check_nm(n: int, m: int):
    if n < 1 or m < 1:
        raise ValueError(f"streaming parameters must be positive, got (N, M) = ({n}, {m})")


def parse_stream_params(text: str) -> Tuple[int, int]:
    """Parses the release's `stream_params` string such as "(3,15)" (never eval'd)."""
    parts = str(text).strip().strip("()[] ").split(",")
    try:
        n, m = (int(p.strip()) for p in parts)
    except ValueError as e:
        raise ValueError(f"stream_params {text!r} is not of the form '(N, M)'") from e
    _check_nm(n, m)
    return n, m


def layout_order(num_text: int, num_units: int, n: int, m: int) -> List[Tuple[int, int]]:
    """The untruncated layout of one example as (kind, index) pairs.

    kind is TEXT (index = text position), SEP, UNIT (index = unit position) or EOS; the length
    is always num_text + num_units + 2.
    """
    _check_nm(n, m)
    if num_text < 0 or num_units < 0:
        raise ValueError(f"negative lengths: text {num_text}, units {num_units}")
    text = [(TEXT, i) for i in range(num_text)] + [(SEP, 0)]
    units = [(UNIT, i) for i in range(num_units)] + [(EOS, 0)]
    text_chunks = -(-len(text) // n)
    unit_chunks = -(-len(units) // m)
    if unit_chunks < text_chunks:
        return text + units
    out = []
    for i in range(text_chunks):
        out += text[i * n:(i + 1) * n]
        out += units[i * m:(i + 1) * m] if i < text_chunks - 1 else units[i * m:]
    return out


def aligned_layout_order(num_text: int, num_units: int, chunk_ends: Sequence[int], n: int,
                         m: int) -> Tuple[List[Tuple[int, int]], List[int]]:
    """The untruncated aligned layout of one example: ((kind, index) pairs, chunk-end positions).

    chunk_ends[c] is the unit index where the speech of text chunk c ends (cumulative, one per
    chunk before the one holding `<sep>`; an end before where chunk c-1 stopped gives chunk c
    no units, one past num_units is clipped). Chunk c takes the units from where chunk c-1
    stopped up to its end, at most M
    (the rest moves on to the next chunk); the chunk with `<sep>` takes every remaining unit
    and EOS. The second list holds the positions whose target is a chunk-ending EOS (their
    chunk got fewer than M units).
    """
    _check_nm(n, m)
    if num_text < 0 or num_units < 0:
        raise ValueError(f"negative lengths: text {num_text}, units {num_units}")
    text = [(TEXT, i) for i in range(num_text)] + [(SEP, 0)]
    chunks = -(-len(text) // n)
    if len(chunk_ends) != chunks - 1:
        raise ValueError(f"{len(chunk_ends)} chunk ends for {num_text} text tokens at N={n}: "
                         f"expected {chunks - 1} (one per chunk before the one with <sep>)")
    out: List[Tuple[int, int]] = []
    ends: List[int] = []
    u = 0
    for c in range(chunks):
        out += text[c * n:(c + 1) * n]
        if c == chunks - 1:
            out += [(UNIT, i) for i in range(u, num_units)] + [(EOS, 0)]
            break
        stop = min(max(int(chunk_ends[c]), u), num_units, u + m)
        out += [(UNIT, i) for i in range(u, stop)]
        if stop - u < m:
            ends.append(len(out) - 1)
        u = stop
    return out, ends


def chunk_ends_from_tokens(token_unit_ends: Sequence[int], n: int) -> List[int]:
    """Per-token unit ends (where the speech of the words completed by each token ends) ->
    the unit end of every text chunk before the one holding `<sep>`."""
    t = len(token_unit_ends)
    chunks = -(-(t + 1) // n)
    return [int(token_unit_ends[min((c + 1) * n, t) - 1]) for c in range(chunks - 1)]


@struct.dataclass
class StreamLayout:
    """Static-shape batched plan [B, S] (numpy on the host, passable into jit as a pytree).

    kind: int32 PAD/TEXT/SEP/UNIT/EOS per position.
    index: int32 text position (TEXT) or unit position (UNIT), 0 elsewhere.
    attention_mask: int32, 1 on real positions (right padding).
    loss_mask: float32, 1 where the position's output is trained, i.e. the *next* position
      holds a unit or EOS token, or the position ends an aligned chunk (inside the truncated
      length).
    lengths: int32 [B] real positions per row (after truncation).
    chunk_end: int32, 1 where the target is an EOS that ends an aligned text chunk (the next
      position holds text); all 0 with fixed chunks.
    """

    kind: np.ndarray
    index: np.ndarray
    attention_mask: np.ndarray
    loss_mask: np.ndarray
    lengths: np.ndarray
    chunk_end: np.ndarray


def layout_length(num_text: int, num_units: int, max_length: int) -> int:
    """Length of one example's layout after the cut at `max_length`."""
    return min(num_text + num_units + 2, max_length)


def build_layout(text_lengths: Sequence[int], unit_lengths: Sequence[int], n: int, m: int,
                 max_length: int = 2048, seq_len: Optional[int] = None,
                 chunk_ends: Optional[Sequence[Optional[Sequence[int]]]] = None
                 ) -> StreamLayout:
    """Batched plan for examples with the given text / unit counts (no `<sep>`/EOS counted).

    `seq_len` is the static padded length S (default `max_length`; pass a bucket size to
    avoid padding to the maximum). Rows are cut at min(max_length, seq_len); pass a seq_len
    at least as long as the longest row to keep every unit. `chunk_ends`: per row, None for
    the release's fixed chunks or the aligned chunks' unit ends (`aligned_layout_order`).
    """
    text_lengths = np.asarray(text_lengths, dtype=np.int64).reshape(-1)
    unit_lengths = np.asarray(unit_lengths, dtype=np.int64).reshape(-1)
    if text_lengths.shape != unit_lengths.shape:
        raise ValueError(f"{len(text_lengths)} text lengths but {len(unit_lengths)} unit lengths")
    if chunk_ends is not None and len(chunk_ends) != len(text_lengths):
        raise ValueError(f"{len(chunk_ends)} rows of chunk ends for {len(text_lengths)} rows")
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    s = max_length if seq_len is None else int(seq_len)
    if s < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    cut = min(s, max_length)
    b = len(text_lengths)
    kind = np.zeros((b, s), np.int32)
    index = np.zeros((b, s), np.int32)
    chunk_end = np.zeros((b, s), np.int32)
    lengths = np.zeros((b,), np.int32)
    for r, (nt, nu) in enumerate(zip(text_lengths, unit_lengths)):
        ends = None if chunk_ends is None else chunk_ends[r]
        if ends is None:
            pairs, eos_at = layout_order(int(nt), int(nu), n, m), []
        else:
            pairs, eos_at = aligned_layout_order(int(nt), int(nu), ends, n, m)
        order = np.asarray(pairs, np.int32)[:cut]
        lengths[r] = len(order)
        kind[r, :len(order)] = order[:, 0]
        index[r, :len(order)] = order[:, 1]
        chunk_end[r, [p for p in eos_at if p < cut]] = 1
    attention_mask = (kind != PAD).astype(np.int32)
    nxt = np.concatenate([kind[:, 1:], np.full((b, 1), PAD, np.int32)], axis=1)
    loss_mask = ((nxt == UNIT) | (nxt == EOS) | (chunk_end == 1)).astype(np.float32)
    return StreamLayout(kind=kind, index=index, attention_mask=attention_mask,
                        loss_mask=loss_mask, lengths=lengths, chunk_end=chunk_end)


def assemble_tokens(layout: StreamLayout, unit_ids, *, sep_token_id: int, eos_token_id: int,
                    unit_offset: int):
    """Token ids and targets of a layout (jnp, jit-friendly, static shapes).

    unit_ids: int [B, U] raw unit values 0..unit_vocab-1 (right-padded; padding is never read).
    Returns (token_ids [B, S], targets [B, S]): token_ids holds the decoder-vocabulary id of
    every SEP / UNIT / EOS position (0 at TEXT and PAD, whose inputs come from elsewhere);
    targets[:, p] = token_ids[:, p + 1] (0 past the end; use `layout.loss_mask`), except EOS
    where an aligned chunk ends (`layout.chunk_end`).
    """
    kind = jnp.asarray(layout.kind)
    idx = jnp.clip(jnp.asarray(layout.index), 0, max(unit_ids.shape[1] - 1, 0))
    if unit_ids.shape[1] == 0:
        units = jnp.zeros(kind.shape, jnp.int32)
    else:
        units = jnp.take_along_axis(jnp.asarray(unit_ids, jnp.int32), idx, axis=1)
    tok = jnp.where(kind == UNIT, units + unit_offset, 0)
    tok = jnp.where(kind == SEP, sep_token_id, tok)
    tok = jnp.where(kind == EOS, eos_token_id, tok).astype(jnp.int32)
    targets = jnp.concatenate([tok[:, 1:], jnp.zeros_like(tok[:, :1])], axis=1)
    targets = jnp.where(jnp.asarray(layout.chunk_end) == 1, eos_token_id, targets)
    return tok, targets.astype(jnp.int32)


def gather_text(layout: StreamLayout, text_embeds):
    """text_embeds [B, T, h] -> [B, S, h] with row `index` at TEXT positions (zeros elsewhere)."""
    kind = jnp.asarray(layout.kind)
    idx = jnp.clip(jnp.asarray(layout.index), 0, text_embeds.shape[1] - 1)
    got = jnp.take_along_axis(text_embeds, idx[..., None], axis=1)
    return jnp.where((kind == TEXT)[..., None], got, jnp.zeros((), text_embeds.dtype))


@dataclasses.dataclass(frozen=True)
class InferenceStep:
    """One step of streaming generation: feed text tokens [text_start, text_end) (their fused
    inputs), then `<sep>` if `sep`, then sample up to `max_units` units (stop early at EOS)."""

    text_start: int
    text_end: int
    sep: bool
    max_units: int


def inference_schedule(num_text: int, n: int, m: int, max_units: int = 1024
                       ) -> List[InferenceStep]:
    """Generation schedule for a reply of `num_text` tokens (known once the LLM has finished).

    Every full chunk of N text tokens is followed by up to M units; the remaining 0..N-1
    tokens are fed with `<sep>` and then units run until EOS (at most max_units). A streaming
    loop applies the same rule online: it feeds a chunk as soon as N new tokens exist and the
    LLM has not finished, and the final step when it has.
    """
    _check_nm(n, m)
    if num_text < 0:
        raise ValueError(f"negative text length {num_text}")
    full = num_text // n  # text-side chunks holding no <sep>
    steps = [InferenceStep(i * n, (i + 1) * n, False, m) for i in range(full)]
    steps.append(InferenceStep(full * n, num_text, True, max_units))
    return steps


def next_step(num_fed: int, num_available: int, finished: bool, n: int, m: int,
              max_units: int = 1024) -> Optional[InferenceStep]:
    """The online form of `inference_schedule`: what to do given how many text tokens were fed
    to the decoder already, how many the LLM has produced, and whether it has finished.
    Returns None when the decoder must wait for more text."""
    if finished:
        if num_available - num_fed >= n:
            return InferenceStep(num_fed, num_fed + n, False, m)
        return InferenceStep(num_fed, num_available, True, max_units)
    if num_available - num_fed >= n:
        return InferenceStep(num_fed, num_fed + n, False, m)
    return None


def describe(layout: StreamLayout, row: int = 0) -> str:
    """Human-readable form of one row, e.g. 't0 t1 t2 u0 ... SEP u5 EOS' (debugging, docs); "|"
    marks a position trained to end its aligned chunk with EOS ('u1|')."""
    names = {TEXT: "t{}", SEP: "SEP", UNIT: "u{}", EOS: "EOS"}
    out = []
    for k, i, end in zip(layout.kind[row], layout.index[row], layout.chunk_end[row]):
        if k == PAD:
            break
        out.append(names[int(k)].format(int(i)) + ("|" if end else ""))
    return " ".join(out)


# ---------------------------------------------------------------------------------------------
# Layouts inside training batches

LAYOUT_KEYS = ("kind", "index", "attention_mask", "loss_mask", "lengths", "chunk_end")


def layout_to_batch(layout: StreamLayout) -> dict:
    """Batch entries (`layout_kind`, ...) of a streaming layout, so it shards like the rest."""
    return {f"layout_{k}": np.asarray(getattr(layout, k)) for k in LAYOUT_KEYS}


def layout_from_batch(batch) -> StreamLayout:
    """The `StreamLayout` stored in a batch by `layout_to_batch`."""
    missing = [f"layout_{k}" for k in LAYOUT_KEYS if f"layout_{k}" not in batch]
    if missing:
        raise ValueError(f"stage 3 batch lacks {missing} (use streaming.layout_to_batch)")
    return StreamLayout(**{k: batch[f"layout_{k}"] for k in LAYOUT_KEYS})
