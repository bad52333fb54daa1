"""`distill`: the frozen LLM writes its own targets (stage 1 replies, emotion-aware replies,
empathetic pairs). A tiny random LLM with the real SmolLM2 tokenizer (GGUF metadata)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from freezeempath_jax import distill
from freezeempath_jax.models.causal_lm import CausalLM
from freezeempath_jax.models.configs import FreezeEmpathConfig, LMConfig
from freezeempath_jax.real_models import MissingModelError, smollm2_gguf


@pytest.fixture(scope="module")
def tiny_llm():
    try:
        path = smollm2_gguf()
    except MissingModelError as e:
        pytest.skip(str(e))
    from freezeempath_jax.checkpoints import load_tokenizer
    tok = load_tokenizer(path)
    cfg = LMConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=False, tie_embeddings=True)
    v = CausalLM(cfg).init(jax.random.key(0), input_ids=jnp.zeros((1, 4), jnp.int32))
    return cfg, nn.meta.unbox(v["params"]), tok


RECORDS = [
    {"id": "a", "transcript": "How do I wrap a present neatly?", "emotion": "happy"},
    {"id": "b", "transcript": "I lost my keys again.", "emotion": "sad"},
    {"id": "c", "transcript": "   ", "emotion": "sad"},  # no transcript: skipped
    {"id": "d", "transcript": "What is the capital of France?", "emotion": "angry"},
]


def test_reply_mode_matches_direct_generation(tiny_llm):
    from freezeempath_jax.text.prompts import chat_text
    from freezeempath_jax.sampling import generate_text, strip_after_eos

    cfg, params, tok = tiny_llm
    rows = list(distill.distill_records(cfg, params, tok, RECORDS, mode="reply",
                                        max_new_tokens=6, batch_size=2, progress=False))
    assert [r["id"] for r in rows] == ["a", "b", "d"]
    assert all(r["reply_mode"] == "reply" and "reply_emotion" not in r for r in rows)
    # The same prompt generated alone gives the same reply (batching/padding changes nothing).
    ids = tok.encode(chat_text(tok, FreezeEmpathConfig(), RECORDS[3]["transcript"]),
                     add_special_tokens=False)
    eos = [tok.eos_token_id]
    alone = generate_text(cfg, params, np.asarray([ids]), max_new_tokens=6, eos_token_id=eos,
                          pad_token_id=tok.eos_token_id)
    text = tok.decode(strip_after_eos(alone, eos)[0], skip_special_tokens=True).strip()
    assert rows[2]["reply"] == text


def test_emotion_modes(tiny_llm):
    cfg, params, tok = tiny_llm
    emo = list(distill.distill_records(cfg, params, tok, RECORDS, mode="emotion_reply",
                                       max_new_tokens=2, batch_size=4, progress=False))
    assert [r["reply_emotion"] for r in emo] == ["happy", "sad", "angry"]
    a = [r["reply_emotion"] for r in distill.distill_records(
        cfg, params, tok, RECORDS, mode="empathetic", max_new_tokens=1, seed=3, progress=False)]
    b = [r["reply_emotion"] for r in distill.distill_records(
        cfg, params, tok, RECORDS, mode="empathetic", max_new_tokens=1, seed=3, progress=False)]
    assert a == b and set(a) <= set(FreezeEmpathConfig().emotions)
    with pytest.raises(ValueError, match="needs an 'emotion' field"):
        list(distill.distill_records(cfg, params, tok, [{"id": "x", "transcript": "hi"}],
                                     mode="emotion_reply", progress=False))


def test_user_text_is_the_trainers_teacher_text():
    from freezeempath_jax.text import PromptRecipe
    from freezeempath_jax.text.prompts import teacher_content
    assert distill.user_text({"transcript": "I failed "}, "emotion_reply", None, "sad") == \
        "I failed (with a sad emotional tone)." == teacher_content("I failed", "sad")
    assert distill.user_text({"transcript": " hi "}, "reply", None, "sad") == "hi"
    mine = PromptRecipe(teacher_emotion="{emotion}: {transcript}")
    assert distill.user_text({"transcript": "hi"}, "empathetic", mine, "sad") == "sad: hi"


def test_read_jsonl_names_bad_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"id": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2"):
        distill.read_jsonl(str(p))
    (tmp_path / "ok.jsonl").write_text('{"id": 1}\n\n{"id": 2}\n')
    assert [r["id"] for r in distill.read_jsonl(str(tmp_path / "ok.jsonl"))] == [1, 2]
