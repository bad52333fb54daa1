"""OSUM-EChat recipe (configs/osum_echat.py): paralinguistic heads beyond emotion (speaker
gender, age group) on the emotion extractor, and "dual thinking" (the assistant turn first
states a short paralinguistic analysis, then replies).

Unit level here: the heads' shapes and splicing, their losses and metrics through the train
step, labels from records and from the synthetic corpus's eSpeak voices, and the analysis
text. Learning on held-out voices and the end-to-end recipe are in
tests/test_osum_echat.py.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from freezeempath_jax.models import FreezeEmpath, presets
from freezeempath_jax.models.configs import AGE_GROUPS, GENDERS
from freezeempath_jax.models.emotion import EmotionExtractor
from freezeempath_jax.sharding import make_mesh
from freezeempath_jax.train import losses
from freezeempath_jax.train.batches import cue_label
from freezeempath_jax.train.step import example_batch, make_train_step

MEL_FRAMES = 60


def tiny_with_heads(splice: bool = False):
    e = dataclasses.replace(presets.TINY.emotion, num_genders=len(GENDERS),
                            num_age_groups=len(AGE_GROUPS), splice_cues=splice)
    return dataclasses.replace(presets.TINY, emotion=e)


@pytest.mark.parametrize("splice", [False, True])
def test_heads_read_the_pooled_vector_and_splice_after_the_emotion_embedding(splice):
    cfg = tiny_with_heads(splice).emotion
    states = jax.random.normal(jax.random.key(0), (3, 2, 10, 32))
    ex = EmotionExtractor(cfg, out_dim=16)
    params = nn.meta.unbox(ex.init(jax.random.key(1), states)["params"])
    out = ex.apply({"params": params}, states)
    assert set(out.cue_logits) == {"gender", "age"}
    assert out.cue_logits["gender"].shape == (2, 2) and out.cue_logits["age"].shape == (2, 3)
    assert cfg.num_tokens == (3 if splice else 1)
    assert out.embedding.shape == (2, cfg.num_tokens, 16)
    assert ("gender_embed" in params) == splice
    if splice:
        # the spliced vector is the gender probabilities times the gender table
        p = jax.nn.softmax(out.cue_logits["gender"], -1)
        np.testing.assert_allclose(out.embedding[:, 1], p @ params["gender_embed"], atol=1e-6)
    # without heads the extractor is unchanged: no cue logits, Q embeddings
    plain = EmotionExtractor(presets.TINY.emotion, out_dim=16)
    pp = nn.meta.unbox(plain.init(jax.random.key(1), states)["params"])
    assert plain.apply({"params": pp}, states).cue_logits is None


def test_cue_losses_add_with_their_weights_and_skip_unlabelled_rows():
    logits = {"gender": jnp.array([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])}
    batch = {"emotion_label": jnp.array([0, 1, -1]), "gender_label": jnp.array([0, 0, -1])}
    ser = jnp.zeros((3, 5))
    base, _ = losses.ser_ce(ser, batch)
    loss, sums = losses.ser_ce(ser, batch, cue_logits=logits, cue_weights={"gender": 0.5})
    nll = [np.log1p(np.exp(-2.0)), np.log1p(np.exp(1.0))]  # rows 0 and 1; row 2 unlabelled
    np.testing.assert_allclose(float(loss - base), 0.5 * np.mean(nll), rtol=1e-6)
    m = losses.finalize_metrics(sums)
    assert float(m["gender_accuracy"]) == 0.5 and float(m["num_gender_examples"]) == 2
    # weight 0: measured, not trained
    loss0, sums0 = losses.ser_ce(ser, batch, cue_logits=logits, cue_weights={"gender": 0.0})
    assert float(loss0) == float(base) and "gender_sum" in sums0
    with pytest.raises(ValueError, match="gender_weight > 0 needs a gender head"):
        losses.ser_ce(ser, batch, cue_logits=None, cue_weights={"gender": 1.0})
    with pytest.raises(ValueError, match=r"needs batch\['age_label'\]"):
        losses.ser_ce(ser, batch, cue_logits={"age": jnp.zeros((3, 3))},
                      cue_weights={"age": 1.0})


@pytest.mark.parametrize("objective", ["ser_ce", "emotion_ce"])
def test_train_step_trains_the_heads(objective):
    model = tiny_with_heads(splice=True)
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    ts = make_train_step(model, dict(stage="2a", objective=objective, steps=10,
                                     learning_rate=3e-3, frozen_dtype="float32",
                                     gender_weight=1.0, age_weight=0.5), mesh)
    state, frozen = ts.init(jax.random.key(0))
    assert {"gender_head", "age_head", "gender_embed", "age_embed"} <= set(
        state.params["emotion"])  # trainable under stage 2a's table
    batch = example_batch(model, objective, 4, mel_frames=MEL_FRAMES, seed=3)
    first = None
    for _ in range(6):
        state, m = ts.step(state, frozen, batch)
        first = first if first is not None else float(m["loss_gender"])
    assert {"loss_gender", "gender_accuracy", "loss_age", "age_accuracy"} <= set(m)
    assert float(m["num_gender_examples"]) == 3  # one row of 4 has no gender label
    assert float(m["loss_gender"]) < first


def test_labels_from_records():
    assert cue_label({"gender": "female"}, "gender") == 0
    assert cue_label({"gender": "male"}, "gender") == 1
    assert cue_label({"age_group": "older"}, "age") == 2
    assert cue_label({}, "gender") == -1 and cue_label(None, "age") == -1
    assert cue_label({"gender": ""}, "gender") == -1
    with pytest.raises(ValueError, match="gender 'boy' is not one of"):
        cue_label({"id": "x", "gender": "boy"}, "gender")


def test_synthetic_voices_have_both_genders():
    from freezeempath_jax.data import synthetic

    genders = {v: synthetic.voice_gender(v) for v in synthetic.VOICES["en"]}
    assert sorted(genders.values()).count("female") == 4
    assert sorted(genders.values()).count("male") == 4
    assert synthetic.voice_gender("cmn") == "male"  # eSpeak's default voice
    with pytest.raises(ValueError, match="unknown variant"):
        synthetic.voice_gender("en+whisper")
    plan = synthetic.synthetic_plan(2, seed=0)
    assert all(r["gender"] == synthetic.voice_gender(r["voice"]) for r in plan)


# ---------------------------------------------------------------------------------------------
# Dual thinking: the analysis text, the training rows, chat


def test_analysis_text():
    from freezeempath_jax.text.prompts import paralinguistic_analysis as analysis

    assert analysis("sad", "female", "young") == "(The user sounds like a young woman, and sad.)"
    assert analysis("neutral", "male") == "(The user sounds like a man, and calm.)"
    assert analysis("angry") == "(The user sounds angry.)"
    assert analysis(None, "male", "older") == "(The user sounds like an older man.)"
    with pytest.raises(ValueError, match="unknown gender 'boy'"):
        analysis("sad", "boy")
    with pytest.raises(ValueError, match="at least one cue"):
        analysis()


def test_dual_thinking_rows_put_the_analysis_in_the_prompt_and_train_the_reply():
    from freezeempath_jax.text import ByteTokenizer
    from freezeempath_jax.train.batches import BatchBuilder
    from freezeempath_jax.train.targets import add_analyses

    cfg = tiny_with_heads()
    tok = ByteTokenizer(cfg.llm.vocab_size, cfg.speech_token_id, cfg.emotion_token_id)
    recs = [{"id": "a", "emotion": "sad", "gender": "female", "reply": "Oh no.",
             "mel": np.zeros((cfg.whisper.n_mels, 60), np.float32)},
            {"id": "b", "emotion": "happy", "gender": "male", "reply": "Great!", "task": "2a",
             "mel": np.zeros((cfg.whisper.n_mels, 60), np.float32)}]
    add_analyses(recs, cfg.emotions)
    assert recs[0]["analysis"] == "(The user sounds like a woman, and sad.)"
    plain = BatchBuilder(cfg, "2b", "emotion_ce", tok, 6, target_len=8)
    dual = BatchBuilder(cfg, "2b", "emotion_ce", tok, 6, target_len=8, dual_thinking=True)
    b0, b1 = plain(recs), dual(recs)
    text = tok.decode([int(t) for t in b1["input_ids"][0]])
    assert "(The user sounds like a woman, and sad.)\nOh no." in text
    # the analysis is prompt (no loss); the reply tokens are trained as without it
    assert b1["loss_mask"][0].sum() == b0["loss_mask"][0].sum()
    trained = b1["targets"][0][b1["loss_mask"][0] > 0]
    assert list(trained) == list(b0["targets"][0][b0["loss_mask"][0] > 0])
    # 2a rows keep 2a's question and no analysis
    np.testing.assert_array_equal(b1["input_ids"][1][:b1["attention_mask"][1].sum()],
                                  b0["input_ids"][1][:b0["attention_mask"][1].sum()])
    assert b1["gender_label"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="dual_thinking applies to stage 2b"):
        BatchBuilder(cfg, "2a", "emotion_ce", tok, 6, dual_thinking=True)


def _chat_model(dual: bool):
    from freezeempath_jax.checkpoints.model_tree import init_boxed_params
    from freezeempath_jax.inference import ChatModel
    from freezeempath_jax.text import ByteTokenizer

    cfg = tiny_with_heads()
    shapes = nn.meta.unbox(jax.eval_shape(lambda r: init_boxed_params(cfg, r),
                                          jax.random.PRNGKey(0)))
    rng = np.random.RandomState(0)
    params = jax.tree.map(lambda s: jnp.asarray(
        (1.0 if s.ndim == 1 else 0.1) * rng.randn(*s.shape), s.dtype), shapes)
    tok = ByteTokenizer(cfg.llm.vocab_size, cfg.speech_token_id, cfg.emotion_token_id)
    return ChatModel(cfg, params, tok, chat_template="plain", audio_seconds=0.6,
                     dual_thinking=dual)


def test_chat_with_dual_thinking_on_and_off_differ():
    from freezeempath_jax.inference import Conversation

    clips = [0.1 * np.random.RandomState(i).randn(9600).astype(np.float32) for i in range(2)]
    off, on = _chat_model(False), _chat_model(True)
    kw = dict(max_new_tokens=6, temperature=0.0)
    r_off, r_on = off.respond(clips, **kw), on.respond(clips, **kw)
    for a, b in zip(r_off, r_on):
        assert a.analysis is None and a.cues == b.cues and set(a.cues) == {"gender", "age"}
        want = f"(The user sounds like {'an' if b.cues['age'] == 'older' else 'a'} " \
               f"{b.cues['age']} {'woman' if b.cues['gender'] == 'female' else 'man'}, and "
        assert b.analysis.startswith(want), (b.analysis, b.cues)
        assert b.emotion == a.emotion
    # the analysis conditions the reply: the frozen LLM continues a different prompt
    assert [a.text_ids for a in r_off] != [b.text_ids for b in r_on]
    # the conversation keeps the analysis as part of the assistant's turn
    conv = Conversation()
    r = on.respond(clips[:1], [conv], **kw)[0]
    assert conv.turns[0].reply_ids == r.analysis_ids + r.text_ids and r.analysis_ids


def test_chat_command_switch(tmp_path):
    import soundfile as sf

    from freezeempath_jax.cli import main
    from freezeempath_jax.inference import run_chat

    wav = tmp_path / "q.wav"
    sf.write(wav, 0.1 * np.random.RandomState(0).randn(9600).astype(np.float32), 16000)
    model = _chat_model(False)
    lines = {}
    for mode in (None, True, False):
        out = tmp_path / f"out_{mode}.jsonl"
        assert run_chat(model, str(wav), str(out), max_new_tokens=4, batch_size=1,
                        temperature=0.0, progress=False, dual_thinking=mode) == 0
        lines[mode] = json.loads(out.read_text())
    assert model.dual_thinking is False  # the switch never changes the caller's model
    assert "analysis" not in lines[None] and "analysis" not in lines[False]
    assert lines[True]["analysis"].startswith("(The user sounds like")
    assert set(lines[True]["paralinguistic"]) == {"gender", "age"}
    with pytest.raises(SystemExit):
        main(["chat", "--model", "x", "--input", str(wav), "--output", "o.jsonl",
              "--dual-thinking", "maybe"])
    # the command line: the default follows the config (osum_echat trains with dual
    # thinking), `--dual-thinking off` overrides it
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "configs", "osum_echat.py") + ":tiny"
    for flag, expect in (([], True), (["--dual-thinking", "off"], False)):
        out = tmp_path / f"cli_{expect}.jsonl"
        assert main(["chat", "--model", config, "--input", str(wav), "--output", str(out),
                     "--max-new-tokens", "3", "--temperature", "0", "--batch-size", "1"]
                    + flag) == 0
        assert ("analysis" in json.loads(out.read_text())) == expect


# ---------------------------------------------------------------------------------------------
# Speaker metadata of the SER corpora


def test_corpora_carry_gender_and_age_for_the_heads(tmp_path):
    from test_data_corpora import build, by_id, make_crema, make_iemocap, read_all

    from freezeempath_jax.data import ser_corpora
    from freezeempath_jax.data.ser_corpora import SkipReport, age_group

    assert [age_group(a) for a in (20, 34.9, 35, 54, 55, 74)] == [
        "young", "young", "middle-aged", "middle-aged", "older", "older"]
    # IEMOCAP: the utterance name's last part starts with its speaker's gender
    recs = by_id(ser_corpora.parse_corpus("iemocap", make_iemocap(tmp_path / "iemocap"),
                                          SkipReport("iemocap")))
    assert recs["Ses01F_impro01_M001"]["gender"] == "male"
    assert recs["Ses05M_script01_1_F001"]["gender"] == "female"
    assert all(r["age_group"] == "" for r in recs.values())
    # CREMA-D without VideoDemographics.csv: empty, and the report says so
    root = make_crema(tmp_path / "crema")
    report = SkipReport("crema_d")
    recs = by_id(ser_corpora.parse_corpus("crema_d", root, report))
    assert all(r["gender"] == "" and r["age_group"] == "" for r in recs.values())
    assert any("VideoDemographics.csv" in n for n in report.notes)
    # ... with it (beside AudioWAV/, as the corpus's repository lays it out)
    (root / "CREMA-D" / "VideoDemographics.csv").write_text(
        "ActorID,Age,Sex,Race,Ethnicity\n1001,51,Male,Caucasian,Not Hispanic\n"
        "1090,21,Female,Asian,Not Hispanic\n1003,62,Male,Caucasian,Not Hispanic\n")
    recs = by_id(ser_corpora.parse_corpus("crema_d", root, SkipReport("crema_d")))
    assert (recs["1001_DFA_ANG_XX"]["gender"], recs["1001_DFA_ANG_XX"]["age_group"]) == (
        "male", "middle-aged")
    assert (recs["1090_TIE_SAD_LO"]["gender"], recs["1090_TIE_SAD_LO"]["age_group"]) == (
        "female", "young")
    assert recs["1004_TSI_NEU_XX"]["gender"] == ""  # an actor the table does not list
    # the tfds builder stores them, and `eval --input tfds:crema_d` reads them back
    b = build("crema_d", root, tmp_path)
    ex = read_all(b, "train")["1001_DFA_ANG_XX"]
    assert ex["gender"] == b"male" and ex["age_group"] == b"middle-aged"


def test_ser_evaluation_scores_the_heads():
    from freezeempath_jax.evaluation.ser import evaluate_ser

    model = _chat_model(False)
    rng = np.random.RandomState(0)
    recs = [{"id": str(i), "samples": 0.1 * rng.randn(9600).astype(np.float32),
             "emotion": "sad", "gender": ("female", "male")[i % 2]} for i in range(6)]
    recs[5].pop("gender")  # no label: left out of the gender scores only
    out = evaluate_ser(model, recs, batch_size=4, resamples=50, progress=False)
    g = out["paralinguistic"]["gender"]
    assert out["n"] == 6 and g["n"] == 5 and g["labels"] == list(GENDERS)
    assert np.sum(g["confusion"]) == 5 and 0.0 <= g["accuracy"] <= 1.0
    assert "age" not in out["paralinguistic"]  # no item has an age label
    assert all("gender_prediction" in r for r in recs)



def test_eval_command_writes_each_heads_confusion(tmp_path):
    import soundfile as sf

    from freezeempath_jax.evaluation import run_eval

    rng = np.random.RandomState(1)
    lines = []
    for i in range(4):
        path = tmp_path / f"{i}.wav"
        sf.write(path, 0.1 * rng.randn(9600).astype(np.float32), 16000)
        lines.append(json.dumps({"id": str(i), "audio": str(path), "emotion": "happy",
                                 "gender": ("female", "male")[i % 2]}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    assert run_eval(_chat_model(False), "ser", str(tmp_path / "m.jsonl"), str(tmp_path / "out"),
                    batch_size=4, resamples=20, progress=False) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["paralinguistic"]["gender"]["n"] == 4
    assert (tmp_path / "out" / "confusion_gender.png").stat().st_size > 0


def test_recipe_config_sizes_and_errors():
    from freezeempath_jax.inference import load_config_file
    from freezeempath_jax.train import defaults

    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "configs", "osum_echat.py")
    full, tiny = load_config_file(config), load_config_file(config + ":tiny")
    assert (full.model.emotion.num_genders, full.model.emotion.num_age_groups) == (2, 3)
    assert (tiny.model.emotion.num_genders, tiny.model.emotion.num_age_groups) == (2, 0)
    assert full.data.dual_thinking and tiny.data.dual_thinking
    assert tiny.loss.gender_weight > 0 and tiny.loss.age_weight == 0
    defaults.validate(tiny)
    with pytest.raises(ValueError, match="choose one of full, tiny, small"):
        load_config_file(config + ":huge")
