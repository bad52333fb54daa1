"""Speech units generated while the reply text is generated: the frozen LLM and the speech
decoder advance together in the (N, M) streaming layout of `freezeempath_jax.models.streaming`,
each with its own KV cache (the release recomputes the decoder's whole prefix at every chunk;
here nothing is recomputed).

One *round* of the jitted loop, for all rows at once (static shapes, per-row masks):

1. the LLM decodes up to N more tokens (`sampling.decode_until`, the same while_loop as text
   generation, so the text equals `generate_from_embeds` for the same seed);
2. each row feeds its decoder what the schedule asks for (`streaming.next_step`): a full chunk
   of N fused text inputs, or - once its text has ended - the remaining 0..N-1 inputs and
   `<sep>`; rows with nothing to feed skip this;
3. each row samples units from its decoder: up to M after a full chunk, and after `<sep>`
   until EOS (at most `max_units`, drawn M per round so a long tail never stalls the other
   rows). A sampled unit is fed back at once; EOS ends the chunk and is never fed.

Rows are in different states (different text lengths, EOS at different times), so the decoder
cache has one write index per row: the decoder runs under `jax.vmap` over rows, each row
writing its cache compactly (slot = position, no padding holes). Its attention mask can stay
all ones: slots past a row's write index are hidden by causality and are overwritten before
they become visible.

Randomness: text token i uses `fold_in(text_key, i)`; the k-th unit draw of row r uses
`fold_in(fold_in(unit_key, r), k)`, with (text_key, unit_key) = fold_in(key(seed), 0 / 1).
Draws depend on nothing but the seed, the row and the count, so the streamed run (one round
per call of the same compiled function) equals the non-streamed run (all rounds in one call),
and both equal `reference_generate_speech`, which recomputes every prefix without a cache.

Unit sampling is restricted to unit tokens and EOS (the decoder is trained only on those
targets; a text id would be no valid unit).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from freezeempath_jax.inference import sampling as sampling_lib
from freezeempath_jax.models import streaming
from freezeempath_jax.models.causal_lm import CausalLM, init_cache
from freezeempath_jax.models.configs import LMConfig, SpeechDecoderConfig
from freezeempath_jax.models.speech_decoder import SpeechDecoder

# Per-row decoder phases.
TEXT_CHUNKS, TAIL, FINISHED = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class UnitSampling:
    """How units are drawn (release: temperature 1.0, no filtering, at most 1024 after <sep>)."""

    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    max_units: int = 1024


def unit_capacity(max_new_tokens: int, n: int, m: int, max_units: int) -> int:
    """Most units one reply can get: M per full text chunk plus the tail after `<sep>`."""
    return (max_new_tokens // n) * m + max_units


@struct.dataclass
class SpeechState:
    """Loop state of joint text + unit generation (a pytree; fixed shapes).

    text: the LLM's `sampling.DecodeState` (hidden states kept).
    round: int32 scalar, rounds completed.
    fed: int32 [B], text positions already fed to the decoder.
    phase: int32 [B], TEXT_CHUNKS / TAIL (`<sep>` fed) / FINISHED.
    units: int32 [B, U], raw unit values (0..unit_vocab-1), -1 past `num_units`.
    num_units: int32 [B]; tail_units: int32 [B], units drawn after `<sep>`.
    draws: int32 [B], unit draws so far (EOS draws included): the key counter.
    dec_logits: float32 [B, V_dec], decoder logits at each row's newest fed position.
    dec_cache: decoder KV cache {"k", "v": [L, B, S, K, D], "index": int32 [B]} (per-row index).
    unit_key: PRNG key of the unit draws.
    """

    text: sampling_lib.DecodeState
    round: jax.Array
    fed: jax.Array
    phase: jax.Array
    units: jax.Array
    num_units: jax.Array
    tail_units: jax.Array
    draws: jax.Array
    dec_logits: jax.Array
    dec_cache: dict
    unit_key: jax.Array


def _fields(st) -> dict:
    return {f.name: getattr(st, f.name) for f in dataclasses.fields(st)}


def _allowed_units(sd: SpeechDecoderConfig, vocab: int):
    ids = jnp.arange(vocab)
    return ((ids >= sd.unit_offset) & (ids < sd.unit_offset + sd.unit_vocab_size)) | (
        ids == sd.eos_token_id)


def draw_unit(logits, key, sd: SpeechDecoderConfig, us: UnitSampling):
    """One unit / EOS id (decoder vocabulary) from one row's logits [V_dec]."""
    logits = jnp.where(_allowed_units(sd, logits.shape[-1]), logits.astype(jnp.float32),
                       -jnp.inf)
    return sampling_lib.sample_logits(logits[None], key, us.temperature, us.top_k, us.top_p)[0]


def unit_key_for(unit_key, row, draw):
    """Key of draw number `draw` of batch row `row`."""
    return jax.random.fold_in(jax.random.fold_in(unit_key, row), draw)


def _decoder_rows(sd: SpeechDecoderConfig, llm_hidden: int, sd_params, cache, x):
    """Runs the decoder on x [B, T, h] with a per-row cache index; logits [B, T, V] and the
    cache with each row's index advanced by T (the caller corrects it)."""
    model = SpeechDecoder(sd, llm_hidden)

    def one(c, xr):
        c1 = {"k": c["k"][:, None], "v": c["v"][:, None], "index": c["index"]}
        out = model.apply({"params": sd_params}, xr[None], cache=c1)
        return out.logits[0], {"k": out.cache["k"][:, 0], "v": out.cache["v"][:, 0],
                               "index": out.cache["index"]}

    axes = {"k": 1, "v": 1, "index": 0}
    return jax.vmap(one, in_axes=(axes, 0), out_axes=(0, axes))(cache, x)


def init_speech_state(text_state: sampling_lib.DecodeState, sd: SpeechDecoderConfig,
                      unit_key, units_cap: int) -> SpeechState:
    """Fresh decoder side for a prefilled LLM state (traceable)."""
    b = text_state.tokens.shape[0]
    n = sd.stream_n
    # + n: a chunk written past a row's real slots must never reach the end, where
    # dynamic_update_slice would shift it back over real slots.
    slots = text_state.max_new_tokens + 1 + units_cap + n
    c = init_cache(sd.lm, b, slots)
    c["index"] = jnp.zeros((b,), jnp.int32)
    zeros = jnp.zeros((b,), jnp.int32)
    return SpeechState(text=text_state, round=jnp.zeros((), jnp.int32), fed=zeros, phase=zeros,
                       units=jnp.full((b, units_cap), -1, jnp.int32), num_units=zeros,
                       tail_units=zeros, draws=zeros,
                       dec_logits=jnp.zeros((b, sd.lm.vocab_size), jnp.float32),
                       dec_cache=c, unit_key=unit_key)


def _feed_text(llm: LMConfig, sd: SpeechDecoderConfig, sd_params, st: SpeechState) -> dict:
    """Step 2 of a round: each row in TEXT_CHUNKS feeds a full chunk, or its rest + <sep>."""
    n = sd.stream_n
    model = SpeechDecoder(sd, llm.hidden_size)
    v = {"params": sd_params}
    text = st.text
    b, max_new = text.tokens.shape
    text_over = text.done | (text.step >= max_new)
    avail = text.lengths
    waiting = avail - st.fed
    in_text = st.phase == TEXT_CHUNKS
    full = in_text & (waiting >= n)
    final = in_text & ~full & text_over
    nfeed = jnp.where(full, n, jnp.where(final, waiting + 1, 0))

    def run(_):
        idx = st.fed[:, None] + jnp.arange(n)[None]  # [B, N]
        idx_c = jnp.clip(idx, 0, max_new - 1)
        ids = jnp.take_along_axis(text.tokens, idx_c, axis=1)
        h = jnp.take_along_axis(text.hidden, idx_c[..., None], axis=1)
        x = model.apply(v, h, ids, method=SpeechDecoder.fuse)  # [B, N, h]
        sep = model.apply(v, method=SpeechDecoder.sep_embedding).astype(x.dtype)
        is_sep = final[:, None] & (jnp.arange(n)[None] == waiting[:, None])
        x = jnp.where(is_sep[..., None], sep, x)
        logits, cache = _decoder_rows(sd, llm.hidden_size, sd_params, st.dec_cache, x)
        last = jnp.take_along_axis(logits, jnp.maximum(nfeed - 1, 0)[:, None, None], axis=1)[:, 0]
        dec_logits = jnp.where((nfeed > 0)[:, None], last, st.dec_logits)
        cache = dict(cache, index=st.dec_cache["index"] + nfeed)
        return dec_logits, cache

    dec_logits, cache = jax.lax.cond(jnp.any(nfeed > 0), run,
                                     lambda _: (st.dec_logits, st.dec_cache), None)
    fed = st.fed + jnp.where(full, n, jnp.where(final, waiting, 0))
    phase = jnp.where(final, TAIL, st.phase)
    return dict(_fields(st), dec_logits=dec_logits, dec_cache=cache, fed=fed, phase=phase), full


def _draw_units(llm: LMConfig, sd: SpeechDecoderConfig, us: UnitSampling, sd_params,
                fields: dict, full) -> dict:
    """Step 3 of a round: up to M unit draws per active row, each fed back at once."""
    m = sd.stream_m
    model = SpeechDecoder(sd, llm.hidden_size)
    b = full.shape[0]
    rows = jnp.arange(b)
    budget0 = jnp.where(full | (fields["phase"] == TAIL), m, 0)

    def cond(c):
        j, f, budget = c
        return (j < m) & jnp.any(budget > 0)

    def body(c):
        j, f, budget = c
        active = budget > 0
        keys = jax.vmap(unit_key_for, in_axes=(None, 0, 0))(f["unit_key"], rows, f["draws"])
        tok = jax.vmap(lambda lg, k: draw_unit(lg, k, sd, us))(f["dec_logits"], keys)
        eos = active & (tok == sd.eos_token_id)
        real = active & ~eos
        unit = tok - sd.unit_offset
        units = f["units"].at[rows, jnp.where(real, f["num_units"], f["units"].shape[1])].set(
            unit, mode="drop")
        in_tail = f["phase"] == TAIL
        tail_units = f["tail_units"] + (real & in_tail)
        ends = in_tail & (eos | (tail_units >= us.max_units))
        phase = jnp.where(active & ends, FINISHED, f["phase"])
        budget = jnp.where(eos | (phase == FINISHED), 0, budget - active)
        emb = model.apply({"params": sd_params}, jnp.where(real, unit, 0)[:, None],
                          method=SpeechDecoder.embed_units)  # [B, 1, h]
        logits, cache = _decoder_rows(sd, llm.hidden_size, sd_params, f["dec_cache"], emb)
        cache = dict(cache, index=f["dec_cache"]["index"] + real)
        f = dict(f, units=units, num_units=f["num_units"] + real, tail_units=tail_units,
                 phase=phase, draws=f["draws"] + active, dec_cache=cache,
                 dec_logits=jnp.where(real[:, None], logits[:, 0], f["dec_logits"]))
        return j + 1, f, budget

    _, fields, _ = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), fields, budget0))
    return fields


def run_rounds(llm: LMConfig, sd: SpeechDecoderConfig, text_mode, us: UnitSampling,
               llm_params, sd_params, st: SpeechState, stop_round) -> SpeechState:
    """Rounds until `round == stop_round` or every row is FINISHED (traceable)."""
    n = sd.stream_n

    def cond(s: SpeechState):
        return (s.round < stop_round) & jnp.any(s.phase != FINISHED)

    def body(s: SpeechState) -> SpeechState:
        text = sampling_lib.decode_until(llm, llm_params, s.text, (s.round + 1) * n,
                                         text_mode)
        fields, full = _feed_text(llm, sd, sd_params, s.replace(text=text))
        fields = _draw_units(llm, sd, us, sd_params, fields, full)
        fields["round"] = s.round + 1
        return SpeechState(**fields)

    return jax.lax.while_loop(cond, body, st)


@functools.partial(jax.jit, static_argnames=("llm", "sd", "units_cap"),
                   donate_argnames=("text_state",))
def _init_jit(text_state, unit_key, *, llm, sd, units_cap):
    sampling_lib._note_trace("speech_init")
    return init_speech_state(text_state, sd, unit_key, units_cap)


@functools.partial(jax.jit, static_argnames=("llm", "sd", "text_mode", "unit_sampling"),
                   donate_argnames=("state",))
def _rounds_jit(llm_params, sd_params, state, stop_round, *, llm, sd, text_mode,
                unit_sampling):
    sampling_lib._note_trace("speech_rounds")
    return run_rounds(llm, sd, text_mode, unit_sampling, llm_params, sd_params, state,
                      stop_round)


@dataclasses.dataclass
class SpeechOutput:
    """Host-side result of a joint generation (numpy)."""

    text_tokens: np.ndarray  # int32 [B, N]: EOS kept, pad after it
    text_lengths: np.ndarray  # int32 [B]: reply tokens before EOS
    units: np.ndarray  # int32 [B, U]: raw unit values, -1 past unit_lengths
    unit_lengths: np.ndarray  # int32 [B]

    def text_ids(self) -> List[List[int]]:
        return [r[:n].tolist() for r, n in zip(self.text_tokens, self.text_lengths)]

    def unit_ids(self) -> List[List[int]]:
        return [r[:n].tolist() for r, n in zip(self.units, self.unit_lengths)]


def _to_output(st: SpeechState) -> SpeechOutput:
    return SpeechOutput(text_tokens=np.asarray(st.text.tokens),
                        text_lengths=np.asarray(st.text.lengths),
                        units=np.asarray(st.units), unit_lengths=np.asarray(st.num_units))


class _Setup:
    """Validated arguments shared by the streamed and the non-streamed entry points."""

    def __init__(self, llm, sd, inputs_embeds, attention_mask, max_new_tokens, temperature,
                 top_k, top_p, seed, eos_token_id, pad_token_id, unit_temperature, max_units):
        if sd.eos_token_id is None:
            raise ValueError("SpeechDecoderConfig.eos_token_id must be set")
        self.llm, self.sd = llm, sd
        self.text_sampling = sampling_lib.make_sampling(temperature, top_k, top_p, eos_token_id,
                                                        pad_token_id)
        self.unit_sampling = UnitSampling(float(unit_temperature), None, None,
                                          int(sd.max_units if max_units is None else max_units))
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != llm.hidden_size:
            raise ValueError(f"inputs_embeds must be [batch, length, {llm.hidden_size}], got "
                             f"shape {inputs_embeds.shape}")
        if attention_mask is None:
            attention_mask = np.ones(inputs_embeds.shape[:2], np.int32)
        sampling_lib.check_prompt(attention_mask)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.inputs_embeds = inputs_embeds
        self.attention_mask = jnp.asarray(attention_mask, jnp.int32)
        self.max_new_tokens = int(max_new_tokens)
        base = seed if isinstance(seed, jax.Array) else jax.random.key(int(seed))
        self.text_key = jax.random.fold_in(base, 0)
        self.unit_key = jax.random.fold_in(base, 1)
        self.units_cap = unit_capacity(self.max_new_tokens, sd.stream_n, sd.stream_m,
                                       self.unit_sampling.max_units)

    def start(self, llm_params) -> SpeechState:
        b, t = self.attention_mask.shape
        cache = init_cache(self.llm, b, t + self.max_new_tokens - 1)
        text = sampling_lib._prefill_jit(
            self.llm, llm_params, None, self.inputs_embeds, self.attention_mask, cache,
            self.text_key, sampling_lib.rules_of(self.text_sampling),
            max_new_tokens=self.max_new_tokens, mode=sampling_lib.mode_of(self.text_sampling),
            keep_hidden=True)
        return _init_jit(text, self.unit_key, llm=self.llm, sd=self.sd,
                         units_cap=self.units_cap)

    def rounds(self, llm_params, sd_params, state, stop_round: int) -> SpeechState:
        return _rounds_jit(llm_params, sd_params, state, jnp.int32(stop_round), llm=self.llm,
                           sd=self.sd, text_mode=sampling_lib.mode_of(self.text_sampling),
                           unit_sampling=self.unit_sampling)


_ARGS_DOC = """
    llm / llm_params: the frozen LLM (`CausalLM` config and params); sd / sd_params: the
    `SpeechDecoder` config and params (reading states of width llm.hidden_size).
    inputs_embeds [B, T, H]: left-padded prompt embeddings (e.g. FreezeEmpath's spliced
    prompt), attention_mask [B, T] (default all real).
    Text: max_new_tokens, temperature / top_k / top_p, eos_token_id (int or list), pad.
    Units: unit_temperature (release 1.0), max_units after `<sep>` (default sd.max_units).
"""


def generate_speech(llm: LMConfig, llm_params, sd: SpeechDecoderConfig, sd_params,
                    inputs_embeds, attention_mask=None, *, max_new_tokens: int,
                    temperature: float = 0.0, top_k: Optional[int] = None,
                    top_p: Optional[float] = None, seed=0, eos_token_id=None,
                    pad_token_id: Optional[int] = None, unit_temperature: float = 1.0,
                    max_units: Optional[int] = None) -> SpeechOutput:
    """Reply text and its speech units in one jitted loop (all rounds in one call).
    """
    s = _Setup(llm, sd, inputs_embeds, attention_mask, max_new_tokens, temperature, top_k,
               top_p, seed, eos_token_id, pad_token_id, unit_temperature, max_units)
    state = s.rounds(llm_params, sd_params, s.start(llm_params), np.iinfo(np.int32).max)
    return _to_output(state)


generate_speech.__doc__ += _ARGS_DOC


def stream_speech(llm: LMConfig, llm_params, sd: SpeechDecoderConfig, sd_params,
                  inputs_embeds, attention_mask=None, *, max_new_tokens: int,
                  temperature: float = 0.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None, seed=0, eos_token_id=None,
                  pad_token_id: Optional[int] = None, unit_temperature: float = 1.0,
                  max_units: Optional[int] = None
                  ) -> Iterator[Tuple[List[List[int]], List[List[int]]]]:
    """Streaming form of `generate_speech`: yields `(text_deltas, unit_deltas)` once per round
    (N new text tokens, the units drawn after them), each a list over batch rows of the new
    ids (text ids before EOS; raw unit values). Concatenated, the deltas equal
    `generate_speech` for the same arguments: both run the same compiled round function.
    """
    s = _Setup(llm, sd, inputs_embeds, attention_mask, max_new_tokens, temperature, top_k,
               top_p, seed, eos_token_id, pad_token_id, unit_temperature, max_units)
    state = s.start(llm_params)
    b = s.attention_mask.shape[0]
    text_seen = np.zeros(b, np.int64)
    units_seen = np.zeros(b, np.int64)
    r = 0
    while True:
        r += 1
        state = s.rounds(llm_params, sd_params, state, r)
        tokens, lengths = np.asarray(state.text.tokens), np.asarray(state.text.lengths)
        units, nu = np.asarray(state.units), np.asarray(state.num_units)
        yield ([tokens[i, text_seen[i]:lengths[i]].tolist() for i in range(b)],
               [units[i, units_seen[i]:nu[i]].tolist() for i in range(b)])
        text_seen, units_seen = lengths.astype(np.int64), nu.astype(np.int64)
        if (np.asarray(state.phase) == FINISHED).all():
            return


stream_speech.__doc__ += _ARGS_DOC


def reference_generate_speech(llm: LMConfig, llm_params, sd: SpeechDecoderConfig, sd_params,
                              inputs_embeds, attention_mask=None, *, max_new_tokens: int,
                              temperature: float = 0.0, top_k: Optional[int] = None,
                              top_p: Optional[float] = None, seed=0, eos_token_id=None,
                              pad_token_id: Optional[int] = None, unit_temperature: float = 1.0,
                              max_units: Optional[int] = None) -> SpeechOutput:
    """Slow reference of `generate_speech` with no KV cache anywhere: every LLM token and
    every unit is sampled from a full forward pass over the whole prefix, following
    `streaming.inference_schedule` row by row (like the release, which recomputes the
    prefix). Same randomness as the fast path. For tests; quadratic cost.
    """
    s = _Setup(llm, sd, inputs_embeds, attention_mask, max_new_tokens, temperature, top_k,
               top_p, seed, eos_token_id, pad_token_id, unit_temperature, max_units)
    ts, us = s.text_sampling, s.unit_sampling
    lm = CausalLM(llm)
    dec = SpeechDecoder(sd, llm.hidden_size)
    vl, vd = {"params": llm_params}, {"params": sd_params}
    b, t = s.attention_mask.shape
    n_new = s.max_new_tokens

    # Every forward below covers the whole prefix with no cache. The prefix is right-padded
    # to a fixed length so that one compiled function serves every length (causal attention
    # keeps the padding invisible to the real positions, whose outputs are the ones read).
    @jax.jit
    def llm_full(x, mask):
        out = lm.apply(vl, inputs_embeds=x, attention_mask=mask)
        return out.logits, out.hidden_states

    @jax.jit
    def dec_full(x):
        return dec.apply(vd, x).logits

    # Text: prompt + reply so far recomputed for every token.
    width = t + n_new
    x = jnp.zeros((b, width, llm.hidden_size), inputs_embeds.dtype)
    x = x.at[:, :t].set(inputs_embeds)
    mask = jnp.zeros((b, width), jnp.int32).at[:, :t].set(s.attention_mask)
    tokens = np.full((b, n_new), ts.pad_token_id, np.int32)
    hidden = np.zeros((b, n_new, llm.hidden_size), np.float32)
    done = np.zeros(b, bool)
    lengths = np.zeros(b, np.int32)
    for i in range(n_new):
        logits, hs = llm_full(x, mask.at[:, t:t + i].set(1))
        tok = np.asarray(sampling_lib.sample_logits(
            logits[:, t + i - 1], jax.random.fold_in(s.text_key, i), ts.temperature, ts.top_k,
            ts.top_p))
        tok = np.where(done, ts.pad_token_id, tok)
        hidden[:, i] = np.asarray(hs[:, t + i - 1], np.float32)
        eos = np.isin(tok, ts.eos_token_ids) & ~done
        lengths += (~done & ~eos)
        done |= eos
        tokens[:, i] = tok
        if done.all() or i == n_new - 1:
            break
        emb = lm.apply(vl, jnp.asarray(tok)[:, None], method=CausalLM.embed)
        x = x.at[:, t + i].set(emb[:, 0].astype(x.dtype))

    # Units: each row alone, the decoder's whole input sequence recomputed for every draw.
    units_out = np.full((b, s.units_cap), -1, np.int32)
    unit_lengths = np.zeros(b, np.int32)
    sep = dec.apply(vd, method=SpeechDecoder.sep_embedding)
    dec_width = n_new + 1 + s.units_cap
    for r in range(b):
        n_text = int(lengths[r])
        fused = dec.apply(vd, jnp.asarray(hidden[r:r + 1, :n_text]),
                          jnp.asarray(tokens[r:r + 1, :n_text]), method=SpeechDecoder.fuse)[0]
        seq = np.zeros((dec_width, sd.lm.hidden_size), np.float32)
        n_seq = 0
        got = []
        draw = 0
        for step in streaming.inference_schedule(n_text, sd.stream_n, sd.stream_m,
                                                 us.max_units):
            for i in range(step.text_start, step.text_end):
                seq[n_seq] = fused[i]
                n_seq += 1
            if step.sep:
                seq[n_seq] = sep
                n_seq += 1
            for _ in range(step.max_units):
                logits = dec_full(jnp.asarray(seq[None], fused.dtype))
                tok = int(draw_unit(logits[0, n_seq - 1], unit_key_for(s.unit_key, r, draw),
                                    sd, us))
                draw += 1
                if tok == sd.eos_token_id:
                    break
                got.append(tok - sd.unit_offset)
                seq[n_seq] = dec.apply(vd, jnp.asarray([tok - sd.unit_offset]),
                                       method=SpeechDecoder.embed_units)[0]
                n_seq += 1
        units_out[r, :len(got)] = got
        unit_lengths[r] = len(got)
    return SpeechOutput(text_tokens=tokens, text_lengths=lengths, units=units_out,
                        unit_lengths=unit_lengths)
