"""Text generation for a bare `CausalLM`: a prefill pass, then ONE jitted `lax.while_loop` over
decode steps with a fixed-size KV cache.

Layout of a generation (B rows, prompt length T, N = max_new_tokens):

- Prompts are left-padded, so every row's last prompt token sits in slot T - 1 and the first
  new token of every row is sampled from the same slot. The cache has T + N - 1 slots (the
  last sampled token is never fed back); `slot_mask [B, S]` marks real prompt slots and every
  generated slot. A token's RoPE position is its row's count of real tokens before it, so a
  padded row decodes exactly as it would alone.
- Token i of every row is sampled with the key `fold_in(key, i)`: the result depends on the
  seed and the step only, never on how the loop is cut (the speech generator runs the same
  loop in slices of N tokens and must reproduce the uncut run).
- A row stops at its first EOS (any id of `eos_token_ids`); the EOS itself is kept in the
  output, as Hugging Face `generate` does, and later slots hold `pad_token_id`. The loop ends
  early once every row has stopped.
- `DecodeState` (a pytree) carries everything between steps; the prefill and the decode loop
  are jitted with the cache / state donated, so the buffers are updated in place.
  jax.jit's cache keys the compiled code on (config, batch, prompt length, max_new_tokens)
  and on two sampling flags only (greedy or not, filtered by top-k / top-p or not): the
  temperature, top-k, top-p, EOS ids and pad id travel as arrays in the state, so changing
  them reuses the compiled code. `trace_counts()` counts traces (tests use it to prove the
  reuse).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from freezeempath_jax.models.causal_lm import (CausalLM, cache_from_layers, cache_to_layers,
                                               forward_unrolled, init_cache, split_layers)
from freezeempath_jax.models.configs import LMConfig, to_dtype

_TRACES: collections.Counter = collections.Counter()


def trace_counts() -> dict:
    """How many times each jitted generation function has been traced (i.e. compiled)."""
    return dict(_TRACES)


def _note_trace(name: str):
    # Runs only while jax traces the function, never on a cache hit.
    _TRACES[name] += 1


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen and when rows stop (split for jit into a static `SamplingMode`
    and traced `rules_of` arrays).

    temperature 0 means greedy; otherwise logits / temperature, then top-k, then top-p
    (nucleus: the smallest set of most likely tokens whose probability reaches top_p).
    """

    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    eos_token_ids: Tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1] or be None, got {self.top_p}")


def eos_tuple(eos_token_id: Union[None, int, Sequence[int]]) -> Tuple[int, ...]:
    """`None`, an int or a list of ints -> a tuple of ints (chat models have several EOS)."""
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, (int, np.integer)):
        return (int(eos_token_id),)
    return tuple(int(e) for e in eos_token_id)


def make_sampling(temperature: float = 0.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None, eos_token_id=None,
                  pad_token_id: Optional[int] = None) -> SamplingConfig:
    """A `SamplingConfig` from user-facing arguments; pad defaults to the first EOS (else 0)."""
    eos = eos_tuple(eos_token_id)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    if top_k is not None and top_k <= 0:
        top_k = None  # 0 means "off" in the Hugging Face convention
    return SamplingConfig(float(temperature), top_k, top_p, eos, int(pad_token_id))


MAX_EOS = 8  # EOS ids a generation can stop on (they travel as a fixed-size array)


@dataclasses.dataclass(frozen=True)
class SamplingMode:
    """The static part of sampling (what changes the compiled code)."""

    greedy: bool
    filtered: bool  # top-k and/or top-p active


def mode_of(sampling: SamplingConfig) -> SamplingMode:
    """The static flags of a `SamplingConfig`."""
    return SamplingMode(greedy=sampling.temperature == 0.0,
                        filtered=sampling.top_k is not None or sampling.top_p is not None)


def rules_of(sampling: SamplingConfig) -> dict:
    """The traced part of sampling: arrays carried in the decode state."""
    if len(sampling.eos_token_ids) > MAX_EOS:
        raise ValueError(f"at most {MAX_EOS} EOS ids are supported, got "
                         f"{len(sampling.eos_token_ids)}")
    eos = np.full((MAX_EOS,), -1, np.int32)
    eos[:len(sampling.eos_token_ids)] = sampling.eos_token_ids
    return {"temperature": jnp.float32(sampling.temperature or 1.0),
            "top_k": jnp.int32(sampling.top_k or 0),
            "top_p": jnp.float32(1.0 if sampling.top_p is None else sampling.top_p),
            "eos": jnp.asarray(eos), "pad": jnp.int32(sampling.pad_token_id)}


def sample_with(logits, key, mode: SamplingMode, rules: dict):
    """One id per row from float logits [B, V] (int32 [B]) with traced settings `rules`.

    Filters apply after the temperature, top-k then top-p on the top-k-renormalised
    distribution, like Hugging Face's logits warpers; top_k 0 and top_p 1 are off.
    """
    logits = logits.astype(jnp.float32)
    if mode.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / rules["temperature"]
    if mode.filtered:
        v = logits.shape[-1]
        rank = jnp.arange(v)
        k = jnp.where(rules["top_k"] > 0, jnp.minimum(rules["top_k"], v), v)
        srt = jnp.sort(logits, axis=-1)[..., ::-1]
        in_k = rank < k
        probs = jax.nn.softmax(jnp.where(in_k, srt, -jnp.inf), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely ids
        keep = in_k & ((before < rules["top_p"]) | (rank == 0))
        cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def sample_logits(logits, key, temperature: float = 0.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None):
    """Chooses one id per row from float logits [B, V] (int32 [B]); greedy when temperature
    is 0 (the key is unused). See `sample_with` for the filters."""
    cfg = SamplingConfig(float(temperature), top_k, top_p)
    return sample_with(logits, key, mode_of(cfg), rules_of(cfg))


def is_eos(tokens, eos_ids):
    """Bool mask of `tokens` [B] equal to any id of `eos_ids` (a padded int array or a
    tuple of ints; -1 entries never match)."""
    eos = jnp.asarray(eos_ids, jnp.int32).reshape(-1)
    if eos.size == 0:
        return jnp.zeros(tokens.shape, bool)
    return jnp.any((tokens[..., None] == eos) & (eos >= 0), axis=-1)


@struct.dataclass
class DecodeState:
    """Loop state of a generation (a pytree; shapes fixed for the whole run).

    step: int32 scalar, tokens sampled so far (index of the next one in `tokens`).
    tokens: int32 [B, N] sampled ids; EOS kept, pad after it.
    hidden: [B, N, H] or None: the last-layer state (after the final norm) that produced each
      token, i.e. h_{t-1} for token t - what the speech decoder reads.
    done: bool [B], the row has emitted EOS.
    lengths: int32 [B], tokens before the row's EOS (its reply length so far).
    positions: int32 [B], RoPE position of the newest sampled token.
    slot_mask: int32 [B, S], real cache slots.
    cache: the CausalLM KV cache.
    key: the base PRNG key (token i uses fold_in(key, i)).
    rules: the traced sampling settings (`rules_of`).
    """

    step: jax.Array
    tokens: jax.Array
    hidden: Optional[jax.Array]
    done: jax.Array
    lengths: jax.Array
    positions: jax.Array
    slot_mask: jax.Array
    cache: Any
    key: jax.Array
    rules: dict

    @property
    def max_new_tokens(self) -> int:
        return self.tokens.shape[1]


def _record(state_fields: dict, tok, h):
    """Writes a freshly sampled token (and its producing state) at `step`; updates stopping."""
    done, step, rules = state_fields["done"], state_fields["step"], state_fields["rules"]
    tok = jnp.where(done, rules["pad"], tok)
    eos = is_eos(tok, rules["eos"]) & ~done
    tokens = jax.lax.dynamic_update_slice_in_dim(state_fields["tokens"], tok[:, None], step, 1)
    hidden = state_fields["hidden"]
    if hidden is not None:
        hidden = jax.lax.dynamic_update_slice_in_dim(hidden, h[:, None].astype(hidden.dtype),
                                                     step, 1)
    lengths = state_fields["lengths"] + (~done & ~eos).astype(jnp.int32)
    return dict(state_fields, tokens=tokens, hidden=hidden, done=done | eos, lengths=lengths,
                step=step + 1)


def prefill_state(config: LMConfig, params, *, input_ids=None, inputs_embeds=None,
                  attention_mask, cache, key, max_new_tokens: int, mode: SamplingMode,
                  rules: dict, keep_hidden: bool) -> DecodeState:
    """Runs the prompt through the LM and samples the first token (traceable, not jitted).

    attention_mask [B, T] (1 = real, left padding); cache from `init_cache` with
    T + max_new_tokens - 1 slots.
    """
    b, t = attention_mask.shape
    s = cache["k"].shape[2]
    slot_mask = jnp.concatenate(
        [attention_mask.astype(jnp.int32), jnp.ones((b, s - t), jnp.int32)], axis=1)
    out = CausalLM(config).apply({"params": params}, input_ids=input_ids,
                                 inputs_embeds=inputs_embeds, attention_mask=slot_mask,
                                 cache=cache, last_logits_only=True)
    h = out.hidden_states[:, -1]
    tok = sample_with(out.logits[:, -1], jax.random.fold_in(key, 0), mode, rules)
    hidden = None
    if keep_hidden:
        hidden = jnp.zeros((b, max_new_tokens, config.hidden_size), to_dtype(config.dtype))
    fields = dict(step=jnp.zeros((), jnp.int32),
                  tokens=jnp.full((b, max_new_tokens), rules["pad"], jnp.int32),
                  hidden=hidden, done=jnp.zeros((b,), bool), lengths=jnp.zeros((b,), jnp.int32),
                  positions=jnp.sum(attention_mask.astype(jnp.int32), axis=1),
                  slot_mask=slot_mask, cache=out.cache, key=key, rules=rules)
    return DecodeState(**_record(fields, tok, h))


def unrolled_decode_default() -> bool:
    """Whether the decode loop runs its layers unrolled here: yes, unless tracing under a mesh
    whose "fsdp" axis shards the weights. There the per-layer weight slices taken before the
    loop would be all-gathered once and held whole for the whole loop (the full LLM on every
    device); the scanned layers gather one layer at a time inside the step instead."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or dict(mesh.shape).get("fsdp", 1) == 1


def decode_until(config: LMConfig, params, state: DecodeState, stop_at,
                 mode: SamplingMode, unrolled: Optional[bool] = None) -> DecodeState:
    """Decode steps while `step < min(stop_at, N)` and some row is still running (traceable).

    One `lax.while_loop`; each step feeds the newest token of every row (stopped rows too:
    static shapes, their outputs are replaced by pad) and samples the next.

    unrolled (default `unrolled_decode_default()`): the layers run unrolled
    (`causal_lm.forward_unrolled`): the per-layer weights are sliced once before the loop
    and each layer's cache is updated in place inside it, so a step reads every weight once
    and copies no cache. Otherwise the scanned model runs each step. Both give the same
    tokens.
    """
    model = CausalLM(config)
    n = state.max_new_tokens
    stop_at = jnp.minimum(jnp.asarray(stop_at, jnp.int32), n)
    if unrolled is None:
        unrolled = unrolled_decode_default()
    if unrolled:
        layer_params = split_layers(params)

    def cond(st: DecodeState):
        return (st.step < stop_at) & ~jnp.all(st.done)

    def body(st: DecodeState) -> DecodeState:
        last = jax.lax.dynamic_slice_in_dim(st.tokens, st.step - 1, 1, axis=1)  # [B, 1]
        if unrolled:
            out = forward_unrolled(config, params, layer_params, input_ids=last,
                                   positions=st.positions[:, None],
                                   attention_mask=st.slot_mask, cache=st.cache)
        else:
            out = model.apply({"params": params}, input_ids=last,
                              positions=st.positions[:, None], attention_mask=st.slot_mask,
                              cache=st.cache)
        tok = sample_with(out.logits[:, 0], jax.random.fold_in(st.key, st.step), mode,
                          st.rules)
        fields = {f.name: getattr(st, f.name) for f in dataclasses.fields(st)}
        fields = _record(fields, tok, out.hidden_states[:, 0])
        fields.update(positions=st.positions + 1, cache=out.cache)
        return DecodeState(**fields)

    if not unrolled:
        return jax.lax.while_loop(cond, body, state)
    state = state.replace(cache=cache_to_layers(state.cache))
    state = jax.lax.while_loop(cond, body, state)
    return state.replace(cache=cache_from_layers(state.cache))


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "mode",
                                             "keep_hidden"), donate_argnames=("cache",))
def _prefill_jit(config, params, input_ids, inputs_embeds, attention_mask, cache, key, rules, *,
                 max_new_tokens, mode, keep_hidden):
    _note_trace("prefill")
    return prefill_state(config, params, input_ids=input_ids, inputs_embeds=inputs_embeds,
                         attention_mask=attention_mask, cache=cache, key=key,
                         max_new_tokens=max_new_tokens, mode=mode, rules=rules,
                         keep_hidden=keep_hidden)


@functools.partial(jax.jit, static_argnames=("config", "mode"), donate_argnames=("state",))
def _decode_jit(config, params, state, stop_at, *, mode):
    _note_trace("decode")
    return decode_until(config, params, state, stop_at, mode)


def check_prompt(attention_mask, what: str = "prompt"):
    """Host-side checks of a prompt mask [B, T]: 2-D, left-padded, no empty row."""
    m = np.asarray(attention_mask)
    if m.ndim != 2:
        raise ValueError(f"{what} attention_mask must be [batch, length], got shape {m.shape}")
    real = m > 0
    if not real[:, -1].all():
        bad = np.flatnonzero(~real[:, -1]).tolist()
        raise ValueError(f"{what}: rows {bad} are empty or not left-padded (their last slot is "
                         "padding); pad prompts on the left")
    if (np.diff(real.astype(np.int8), axis=1) < 0).any():
        raise ValueError(f"{what}: padding found after a real token; use left padding only")


def mask_from_pad(input_ids, pad_token_id: Optional[int]):
    """Left-padding mask [B, T]: slots before a row's first non-pad token are padding."""
    ids = np.asarray(input_ids)
    if pad_token_id is None:
        return np.ones(ids.shape, np.int32)
    return (np.cumsum(ids != pad_token_id, axis=1) > 0).astype(np.int32)


@struct.dataclass
class GenerateOutput:
    tokens: jax.Array  # int32 [B, N]: EOS kept, pad after it
    hidden: Optional[jax.Array]  # [B, N, H]: the state that produced each token (h_{t-1})
    lengths: jax.Array  # int32 [B]: tokens before EOS
    finished: jax.Array  # bool [B]: EOS was produced


def _run(config: LMConfig, params, input_ids, inputs_embeds, attention_mask, *,
         max_new_tokens: int, sampling: SamplingConfig, seed, keep_hidden: bool
         ) -> DecodeState:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_prompt(attention_mask)
    b, t = np.shape(attention_mask)
    cache = init_cache(config, b, t + max_new_tokens - 1)
    key = seed if isinstance(seed, jax.Array) else jax.random.key(int(seed))
    mode = mode_of(sampling)
    state = _prefill_jit(config, params, input_ids, inputs_embeds,
                         jnp.asarray(attention_mask, jnp.int32), cache, key, rules_of(sampling),
                         max_new_tokens=max_new_tokens, mode=mode, keep_hidden=keep_hidden)
    return _decode_jit(config, params, state, jnp.int32(max_new_tokens), mode=mode)


def generate_text(config: LMConfig, params, input_ids, *, max_new_tokens: int,
                  temperature: float = 0.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None, seed=0, eos_token_id=None,
                  pad_token_id: Optional[int] = None, attention_mask=None):
    """Generates `max_new_tokens` ids per row with a bare `CausalLM` (params of that model).

    input_ids: int [B, T], left-padded. attention_mask [B, T] (1 = real) defaults to "every
    slot before the first non-pad token is padding" (all real when pad_token_id is None).
    eos_token_id: None, an int or a list of ints; a row stops at its first EOS, which is kept,
    and the rest of the row holds pad_token_id (default: the first EOS id, else 0).
    Returns int32 [B, max_new_tokens].
    """
    sampling = make_sampling(temperature, top_k, top_p, eos_token_id, pad_token_id)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    if attention_mask is None:
        attention_mask = mask_from_pad(input_ids, pad_token_id)
    if np.shape(attention_mask) != input_ids.shape:
        raise ValueError(f"attention_mask shape {np.shape(attention_mask)} differs from "
                         f"input_ids {input_ids.shape}")
    state = _run(config, params, input_ids, None, attention_mask,
                 max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, keep_hidden=False)
    return state.tokens


def generate_from_embeds(config: LMConfig, params, inputs_embeds, attention_mask=None, *,
                         max_new_tokens: int, temperature: float = 0.0,
                         top_k: Optional[int] = None, top_p: Optional[float] = None, seed=0,
                         eos_token_id=None, pad_token_id: Optional[int] = None,
                         keep_hidden: bool = True) -> GenerateOutput:
    """Like `generate_text`, but the prompt is given as input embeddings [B, T, H] (e.g. a
    FreezeEmpath prompt with speech and emotion embeddings spliced in) with a left-padding
    `attention_mask [B, T]` (default all real).

    Also returns, for each generated token, the LLM's last-layer state that produced it
    (`hidden [B, N, H]`, h_{t-1} for token t) - the speech decoder's input.
    """
    sampling = make_sampling(temperature, top_k, top_p, eos_token_id, pad_token_id)
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != config.hidden_size:
        raise ValueError(f"inputs_embeds must be [batch, length, {config.hidden_size}], got "
                         f"shape {inputs_embeds.shape}")
    if attention_mask is None:
        attention_mask = np.ones(inputs_embeds.shape[:2], np.int32)
    if np.shape(attention_mask) != inputs_embeds.shape[:2]:
        raise ValueError(f"attention_mask shape {np.shape(attention_mask)} differs from "
                         f"inputs_embeds {inputs_embeds.shape[:2]}")
    state = _run(config, params, None, inputs_embeds, attention_mask,
                 max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                 keep_hidden=keep_hidden)
    return GenerateOutput(tokens=state.tokens, hidden=state.hidden, lengths=state.lengths,
                          finished=state.done)


def strip_after_eos(tokens, eos_token_id) -> list:
    """Host helper: each row's ids before its first EOS, as lists of ints."""
    eos = set(eos_tuple(eos_token_id))
    out = []
    for row in np.asarray(tokens).tolist():
        cut = next((i for i, x in enumerate(row) if x in eos), len(row))
        out.append(row[:cut])
    return out
