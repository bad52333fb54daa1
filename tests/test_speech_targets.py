"""The stage-3 data recipe (`train.speech_targets.stage3_records`) on a tiny random FreezeEmpath
and real speech: the greedy reply comes first for every clip, sampled replies add distinct
sentences with the states that produced them, every record is ready for aligned chunks, and
the same seed gives the same records."""

import numpy as np
import pytest

from freezeempath_jax import inference as chat
from freezeempath_jax.audio import load_audio
from freezeempath_jax.models import presets
from freezeempath_jax.models.configs import UnitCodecConfig
from freezeempath_jax.text import ByteTokenizer
from freezeempath_jax.train.speech_targets import replies_with_hidden, stage3_records
from test_chat import _random_params  # numpy-random TINY parameters

CFG = presets.TINY
CODEC = UnitCodecConfig(codebook_size=8, griffin_lim_iters=4, length_bucket=16)
NAMES = ("helpful_base_1", "vicuna_2", "helpful_base_4")


class _LetterTokenizer(ByteTokenizer):
    """Byte tokenizer whose ids decode to lower-case letters and spaces, so that a random
    model's replies are words eSpeak can read."""

    def decode(self, ids):
        keep = [int(i) - self.offset for i in ids if int(i) >= self.offset]
        return "".join(" " if i % 5 == 0 else chr(ord("a") + i % 26) for i in keep)


@pytest.fixture
def setup(shared_audio_dir):
    tok = _LetterTokenizer(CFG.llm.vocab_size, CFG.speech_token_id, CFG.emotion_token_id)
    model = chat.ChatModel(CFG, _random_params(), tok, chat_template="plain", audio_seconds=3.0)
    recs = [{"id": n, "emotion": e} for n, e in zip(NAMES, ("sad", "happy", "neutral"))]
    clips = [load_audio(str(shared_audio_dir / f"{n}.wav"))[:48000] for n in NAMES]
    return model, recs, clips


def test_sampled_replies_add_distinct_sentences(setup):
    model, recs, clips = setup
    kept, (codec, params), audios = stage3_records(
        model, recs, clips, max_new_tokens=12, codec_config=CODEC, samples=3, seed=0)
    greedy = replies_with_hidden(model, clips, max_new_tokens=12)
    by_clip = {}
    for r in kept:
        by_clip.setdefault(r["id"].split("#")[0], []).append(r)
    for rec, (ids, hid) in zip(recs, greedy):
        rows = by_clip[rec["id"]]
        # the greedy reply (what `chat` says) is the clip's first record, under its own id
        assert rows[0]["id"] == rec["id"] and rows[0]["reply_ids"] == ids
        np.testing.assert_array_equal(rows[0]["llm_hidden_prev"], hid)
        extra = [r["id"] for r in rows[1:]]  # sampled ones, in pass order, named by pass
        assert set(extra) <= {f"{rec['id']}#s1", f"{rec['id']}#s2"} and extra == sorted(extra)
        assert len({tuple(r["reply_ids"]) for r in rows}) == len(rows)  # no repeats
        for r in rows:
            assert r["emotion"] == rec["emotion"]
            assert r["llm_hidden_prev"].shape == (len(r["reply_ids"]), CFG.llm.hidden_size)
            ends = r["token_unit_ends"]
            assert len(ends) == len(r["reply_ids"]) and ends[-1] == len(r["units"])
            assert all(a <= b for a, b in zip(ends, ends[1:]))
            assert r["units"] and max(r["units"]) < CODEC.codebook_size
    # sampling at 0.8 from a random model gives new sentences for most clips
    assert len(kept) > len(recs)
    assert len(audios) == len(kept)
    again, _, _ = stage3_records(model, recs, clips, max_new_tokens=12, codec_config=codec,
                                 codec_params=params, samples=3, seed=0)
    assert [(r["id"], r["reply_ids"], r["units"]) for r in again] == \
        [(r["id"], r["reply_ids"], r["units"]) for r in kept]
    other, _, _ = stage3_records(model, recs, clips, max_new_tokens=12, codec_config=codec,
                                 codec_params=params, samples=3, seed=1)
    assert [r["reply_ids"] for r in other] != [r["reply_ids"] for r in kept]


def test_samples_must_be_positive(setup):
    model, recs, clips = setup
    with pytest.raises(ValueError, match="samples must be >= 1"):
        stage3_records(model, recs, clips, max_new_tokens=4, codec_config=CODEC, samples=0)
