"""Aligned streaming chunks (stage 3): each text chunk followed by its own speech, a chunk
with fewer than M units trained to end with EOS; the per-token unit ends from eSpeak's word
timings; the trainer's batches carrying them. Generation is unchanged: the sequence it feeds
when the decoder ends chunks where the training layout does must be that layout."""

import jax.numpy as jnp
import numpy as np
import pytest

from freezeempath_jax.models import streaming
from freezeempath_jax.models.streaming import EOS, SEP, TEXT, UNIT
from freezeempath_jax.train.speech_targets import token_unit_ends


def test_docstring_example():
    lay = streaming.build_layout([4], [7], 3, 5, seq_len=13, chunk_ends=[[2]])
    assert streaming.describe(lay) == "t0 t1 t2 u0 u1| t3 SEP u2 u3 u4 u5 u6 EOS"
    units = jnp.arange(7)[None] + 10
    tok, tgt = streaming.assemble_tokens(lay, units, sep_token_id=1, eos_token_id=2,
                                         unit_offset=0)
    # t2 -> u0, u0 -> u1, u1 -> EOS (chunk ends), t3 -> nothing, SEP -> u2 ... u6 -> EOS
    want_mask = [0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0]
    np.testing.assert_array_equal(lay.loss_mask[0], want_mask)
    got = [int(t) for t, m in zip(tgt[0], want_mask) if m]
    assert got == [10, 11, 2, 12, 13, 14, 15, 16, 2]


def test_chunk_without_speech_ends_at_its_last_text_position():
    lay = streaming.build_layout([6], [4], 3, 5, seq_len=12, chunk_ends=[[0, 3]])
    assert streaming.describe(lay) == "t0 t1 t2| t3 t4 t5 u0 u1 u2| SEP u3 EOS"
    assert lay.loss_mask[0, 2] == 1 and lay.chunk_end[0, 2] == 1
    # chunk 1 got 3 < 5 units: u2 is trained to end it; the chunk with <sep> is not
    assert lay.chunk_end[0].sum() == 2 and lay.chunk_end[0, 8] == 1


def test_long_chunk_is_capped_at_m_and_the_rest_moves_on():
    # chunk 0's speech ends at unit 8 but M = 5: 5 units, no EOS (generation stops at M),
    # the other 3 open chunk 1, whose end (9) leaves it 1 more and an EOS
    lay = streaming.build_layout([6], [12], 3, 5, seq_len=20, chunk_ends=[[8, 9]])
    assert streaming.describe(lay) == ("t0 t1 t2 u0 u1 u2 u3 u4 t3 t4 t5 u5 u6 u7 u8| SEP u9 "
                                       "u10 u11 EOS")


def test_fixed_rows_and_aligned_rows_mix_in_one_batch():
    lay = streaming.build_layout([4, 4], [7, 7], 3, 5, seq_len=13, chunk_ends=[None, [2]])
    assert streaming.describe(lay, 0) == streaming.describe(
        streaming.build_layout([4], [7], 3, 5, seq_len=13))
    assert streaming.describe(lay, 1) == "t0 t1 t2 u0 u1| t3 SEP u2 u3 u4 u5 u6 EOS"


def test_wrong_number_of_chunk_ends_is_refused():
    with pytest.raises(ValueError, match="expected 1"):
        streaming.build_layout([4], [7], 3, 5, chunk_ends=[[2, 5]])


def _generate(nt, nu, ends, n, m):
    """What generation feeds when its decoder ends each text chunk after the units the
    aligned layout gives it: the inference schedule, each full chunk followed by its units
    until EOS (not fed) or M, the tail after <sep> until EOS (fed last, as in training)."""
    out, u = [], 0
    for c, step in enumerate(streaming.inference_schedule(nt, n, m, max_units=1024)):
        out += [(TEXT, i) for i in range(step.text_start, step.text_end)]
        if step.sep:
            out += [(SEP, 0)] + [(UNIT, i) for i in range(u, nu)] + [(EOS, 0)]
            break
        stop = min(max(ends[c], u), nu, u + step.max_units)
        out += [(UNIT, i) for i in range(u, stop)]
        u = stop
    return out


@pytest.mark.parametrize("n,m", [(3, 15), (3, 5), (1, 4), (2, 2)])
def test_generation_feeds_the_aligned_layout(n, m):
    rng = np.random.default_rng(n * 7 + m)
    for _ in range(60):
        nt, nu = int(rng.integers(0, 20)), int(rng.integers(0, 80))
        token_ends = np.sort(rng.integers(0, nu + 1, size=nt)).tolist()
        ends = streaming.chunk_ends_from_tokens(token_ends, n)
        order, eos_at = streaming.aligned_layout_order(nt, nu, ends, n, m)
        assert order == _generate(nt, nu, ends, n, m)
        assert len(order) == nt + nu + 2
        # every chunk-ending EOS sits right before text (or <sep>), never before a unit
        assert all(order[p + 1][0] in (TEXT, SEP) for p in eos_at)
        # each unit run before <sep> is at most M long, and shorter exactly when it ends
        # with a chunk EOS
        runs, p = [], 0
        sep = [k for k, _ in order].index(SEP)
        while p < sep:
            if order[p][0] == UNIT:
                q = p
                while order[q][0] == UNIT:
                    q += 1
                runs.append((p, q - p))
                p = q
            else:
                p += 1
        for start, length in runs:
            assert length <= m
            assert (start + length - 1 in eos_at) == (length < m)


def test_token_unit_ends_from_word_timings():
    # "I'm here to help." tokens: "I" "'m" " here" " to" " help" "."; words end at characters
    # 3, 8, 11, 16 and start at 0.04, 0.30, 0.52, 0.70 s; 50 units a second, 60 units
    char_ends = [1, 3, 8, 11, 16, 17]
    words = [(3, 0.04), (8, 0.30), (11, 0.52), (16, 0.70)]
    got = token_unit_ends(char_ends, words, 60, 50.0)
    # "I" completes nothing: speech of nothing ends where "I'm" starts (unit 2)
    assert got == [2, 15, 26, 35, 60, 60]


def test_stage3_renders_give_monotone_ends_at_word_starts():
    """The real path: eSpeak's word events on a reply and SmolLM2's tokens."""
    from freezeempath_jax.data.reply_speech import render_reply
    from freezeempath_jax.real_models import smollm2_gguf
    from freezeempath_jax.text.tokenizers import Codec, load_tokenizer
    from freezeempath_jax.train.speech_targets import token_char_ends

    tok = Codec(load_tokenizer(smollm2_gguf()))
    text = "I'm sorry to hear that. Let's fix your bike together."
    ids = tok.encode(text)
    audio, words = render_reply(text, "sad", with_words=True)
    # a word ends at the next space: "I'm" (eSpeak's event covers "I"), "that." (the pause
    # after it comes with the full stop)
    assert [text[:e].split()[-1] for e, _ in words][:5] == ["I'm", "sorry", "to", "hear",
                                                           "that."]
    units = len(audio) // 320
    ends = token_unit_ends(token_char_ends(tok, ids), words, units, 50.0)
    assert len(ends) == len(ids) and ends == sorted(ends) and ends[-1] == units
    starts = {int(round(s * 50)) for _, s in words}
    assert set(ends[:-1]) <= starts | {units}
    # the speech grows with the text: a chunk of 3 tokens never holds more than ~1.5 s
    chunk = np.diff([0] + streaming.chunk_ends_from_tokens(ends, 3))
    assert chunk.max() < 80, chunk
