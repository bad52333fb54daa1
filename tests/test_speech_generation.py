"""Joint text + speech-unit generation (`freezeempath_jax.inference.speech_generation`): the streamed
output equals the non-streamed output for the same seed, and both equal the slow reference
that recomputes every prefix with no KV cache (`reference_generate_speech`, which follows
`streaming.inference_schedule`). Rows end their text at different points: on a multiple of N
(the `<sep>` chunk holds no text), at once (empty reply) and at max_new_tokens."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from freezeempath_jax.inference import sampling
from freezeempath_jax.inference import speech_generation as sg
from freezeempath_jax.models import presets, streaming
from freezeempath_jax.models.causal_lm import CausalLM
from freezeempath_jax.models.speech_decoder import SpeechDecoder

LLM = presets.TINY.llm
SD = dataclasses.replace(presets.TINY.speech_decoder, max_units=12)  # N=3, M=5
N, M = SD.stream_n, SD.stream_m
MAX_NEW = 8


def _random(shapes, seed):
    """Numpy-random values for an abstract tree (compiling `init` is slow on CPU)."""
    rng = np.random.RandomState(seed)

    def make(path, s):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.asarray(1.0 + 0.1 * rng.randn(*s.shape), s.dtype)
        std = 1.0 if "embedding" in name else 0.15
        return jnp.asarray(std * rng.randn(*s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(make, nn.meta.unbox(shapes))


@pytest.fixture(scope="module")
def params():
    llm = _random(jax.eval_shape(lambda: CausalLM(LLM).init(
        jax.random.key(0), input_ids=jnp.zeros((1, 1), jnp.int32)))["params"], 0)
    layout = streaming.build_layout([2], [3], N, M, seq_len=8)
    sd = _random(jax.eval_shape(lambda: SpeechDecoder(SD, LLM.hidden_size).init(
        jax.random.key(0), jnp.zeros((1, 2, LLM.hidden_size)), jnp.zeros((1, 2), jnp.int32),
        jnp.zeros((1, 3), jnp.int32), layout, method=SpeechDecoder.unit_loss))["params"], 1)
    return llm, sd


@pytest.fixture(scope="module")
def prompt():
    """Embeddings of three left-padded prompts (lengths 6, 3, 5)."""
    rng = np.random.RandomState(2)
    emb = rng.randn(3, 6, LLM.hidden_size).astype(np.float32)
    mask = np.zeros((3, 6), np.int32)
    for i, n in enumerate([6, 3, 5]):
        mask[i, 6 - n:] = 1
    emb = emb * mask[..., None]
    return jnp.asarray(emb), mask


def _first(row, eos):
    return next((i for i, x in enumerate(row) if x in eos), len(row))


def _pick_eos(tokens):
    """EOS ids making one row stop after 3 or 6 tokens (a multiple of N, so the last chunk
    is `<sep>` alone), one row at once (empty reply) and one never (it runs to MAX_NEW):
    picked from the greedy text. Returns (eos ids, wanted text lengths)."""
    import itertools
    for mult, zero, full in itertools.permutations(range(3)):
        for k in (6, 3):
            eos = {int(tokens[mult, k]), int(tokens[zero, 0])}
            want = {mult: k, zero: 0, full: MAX_NEW}
            if all(_first(tokens[r], eos) == want[r] for r in range(3)):
                return sorted(eos), [want[r] for r in range(3)]
    pytest.fail(f"no EOS choice gives the wanted lengths for greedy text {tokens.tolist()}")


def _check_same(a: sg.SpeechOutput, b: sg.SpeechOutput):
    assert a.text_ids() == b.text_ids()
    assert a.unit_ids() == b.unit_ids()
    np.testing.assert_array_equal(a.text_tokens, b.text_tokens)


def _run_all(params, prompt, **kw):
    llm_p, sd_p = params
    emb, mask = prompt
    fast = sg.generate_speech(LLM, llm_p, SD, sd_p, emb, mask, **kw)
    chunks = list(sg.stream_speech(LLM, llm_p, SD, sd_p, emb, mask, **kw))
    ref = sg.reference_generate_speech(LLM, llm_p, SD, sd_p, emb, mask, **kw)
    return fast, chunks, ref


def _joined(chunks, b):
    text = [sum((c[0][i] for c in chunks), []) for i in range(b)]
    units = [sum((c[1][i] for c in chunks), []) for i in range(b)]
    return text, units


def test_greedy_text_stream_equals_batch_equals_no_cache_reference(params, prompt):
    llm_p, _ = params
    emb, mask = prompt
    plain = sampling.generate_from_embeds(LLM, llm_p, emb, mask, max_new_tokens=MAX_NEW)
    eos, lengths = _pick_eos(np.asarray(plain.tokens))
    fast, chunks, ref = _run_all(params, prompt, max_new_tokens=MAX_NEW, eos_token_id=eos,
                                 seed=5)
    _check_same(fast, ref)
    assert fast.text_lengths.tolist() == lengths
    full = lengths.index(MAX_NEW)
    np.testing.assert_array_equal(fast.text_tokens[full], np.asarray(plain.tokens)[full])

    text, units = _joined(chunks, 3)
    assert text == fast.text_ids() and units == fast.unit_ids()
    for t_delta, u_delta in chunks:  # at most N new text tokens and M units per round
        assert all(len(x) <= N for x in t_delta) and all(len(x) <= M for x in u_delta)
    for r, n_text in enumerate(fast.text_lengths):
        got = fast.unit_ids()[r]
        assert len(got) <= (n_text // N) * M + SD.max_units
        assert all(0 <= u < SD.unit_vocab_size for u in got)
    assert sum(map(len, fast.unit_ids())) > 0


def test_sampled_text_stream_equals_batch_equals_no_cache_reference(params, prompt):
    kw = dict(max_new_tokens=MAX_NEW, temperature=1.0, top_k=50, top_p=0.9,
              eos_token_id=[7, 11, 13, 17, 19, 23], seed=11, unit_temperature=0.8)
    fast, chunks, ref = _run_all(params, prompt, **kw)
    _check_same(fast, ref)
    text, units = _joined(chunks, 3)
    assert text == fast.text_ids() and units == fast.unit_ids()
    again = sg.generate_speech(LLM, params[0], SD, params[1], *prompt, **kw)
    _check_same(fast, again)
    other = sg.generate_speech(LLM, params[0], SD, params[1], *prompt,
                               **dict(kw, seed=12))
    assert other.unit_ids() != fast.unit_ids()
