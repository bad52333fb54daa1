"""`freezeempath-jax eval` on a tiny random FreezeEmpath: every task writes its files, bad items
(a missing field, an unknown label, a bad clip, an unparseable judge answer) get their own
error while the rest is scored, SER labels equal what `chat` predicts and its UA equals
scikit-learn's balanced accuracy, the ablation runs every setting side by side, retention
finds the inner LLM identical to itself alone and notices a changed one."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
from flax import linen as nn

from freezeempath_jax import evaluation
from freezeempath_jax.checkpoints.model_tree import init_boxed_params
from freezeempath_jax.evaluation import common
from freezeempath_jax.evaluation.judge import parse_rating
from freezeempath_jax.evaluation.ser import ser_scores
from freezeempath_jax.inference import ChatModel, run_chat
from freezeempath_jax.models import presets
from freezeempath_jax.text import ByteTokenizer

CFG = presets.TINY
SECONDS = 3.0
BATCH = 4
NEW = 6  # new tokens per reply: enough to compare texts, cheap to compile and run


def _random_params(seed=0):
    shapes = nn.meta.unbox(jax.eval_shape(lambda r: init_boxed_params(CFG, r),
                                          jax.random.PRNGKey(0)))
    rng = np.random.RandomState(seed)

    def make(path, s):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.asarray(1.0 + 0.1 * rng.randn(*s.shape), s.dtype)
        std = 1.0 if "embedding" in name else 0.1
        return jnp.asarray(std * rng.randn(*s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(make, shapes)


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer(CFG.llm.vocab_size, CFG.speech_token_id, CFG.emotion_token_id)


@pytest.fixture(scope="module")
def cm(tok):
    return ChatModel(CFG, _random_params(), tok, chat_template="plain", audio_seconds=SECONDS,
                     max_units=8)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Six short clips of differently coloured noise and tones (distinct encoder inputs)."""
    root = tmp_path_factory.mktemp("clips")
    rng = np.random.RandomState(1)
    paths = []
    for i in range(6):
        t = np.arange(int(16000 * (1.0 + 0.3 * i))) / 16000
        x = 0.3 * np.sin(2 * np.pi * (120 + 90 * i) * t) + (0.05 + 0.1 * i) * rng.randn(t.size)
        p = root / f"c{i}.wav"
        sf.write(p, x.astype(np.float32), 16000)
        paths.append(str(p))
    (root / "garbage.wav").write_text("not audio")
    return root, paths


def _manifest(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    return str(path)


def _items(out):
    return {r["id"]: r for r in map(json.loads, (out / "items.jsonl").read_text().splitlines())}


# ------------------------------------------------------------------------------- scores


def test_ser_scores_match_sklearn():
    from sklearn.metrics import balanced_accuracy_score, f1_score

    rng = np.random.RandomState(0)
    for _ in range(5):
        truth = rng.randint(0, 4, 60)  # class 4 never true; sometimes predicted
        pred = np.where(rng.rand(60) < 0.5, truth, rng.randint(0, 5, 60))
        s = ser_scores(truth, pred, 5)
        assert s["unweighted_accuracy"] == pytest.approx(balanced_accuracy_score(truth, pred))
        assert s["macro_f1"] == pytest.approx(f1_score(truth, pred, average="macro"))
        assert s["accuracy"] == pytest.approx(np.mean(truth == pred))
        assert s["confusion"].sum() == 60 and s["confusion"][4].sum() == 0


def test_text_scores():
    assert common.normalize_answer("The  Eiffel-Tower, in PARIS!") == "eiffel tower in paris"
    assert common.answer_in_reply("It's in Paris, France.", ["paris"])
    assert not common.answer_in_reply("Parisian food", ["Paris"])  # whole words only
    assert common.rouge_l("w b c d", "w x c d") == pytest.approx(0.75)
    assert common.token_f1("the cat sat", "cat sat down") == pytest.approx(0.8)
    assert parse_rating("good. [[8]]") == 8 and parse_rating("[[11]] or [[ 7 ]]") == 7
    assert parse_rating("Rating: 8/10") is None
    ci = common.bootstrap_ci(50, lambda idx: float(np.mean(idx < 25)), seed=3)
    assert ci["low"] < 0.5 < ci["high"]
    assert ci == common.bootstrap_ci(50, lambda idx: float(np.mean(idx < 25)), seed=3)


# ---------------------------------------------------------------------------------- ser


def test_ser_agrees_with_chat_and_reports_bad_items(cm, clips, tmp_path):
    from sklearn.metrics import balanced_accuracy_score

    root, paths = clips
    labels = ["angry", "happy", "sad", "neutral", "neu", "surprised"]  # "neu" is an alias
    rows = [{"id": f"c{i}", "audio": p, "emotion": e} for i, (p, e) in
            enumerate(zip(paths, labels))]
    rows += [{"id": "no_label", "audio": paths[0]},
             {"id": "bad_label", "audio": paths[0], "emotion": "bored"},
             {"id": "missing", "audio": str(root / "nope.wav"), "emotion": "sad"},
             {"id": "garbage", "audio": str(root / "garbage.wav"), "emotion": "sad"}]
    manifest = _manifest(tmp_path / "ser.jsonl", rows)
    out = tmp_path / "ser"
    failed = evaluation.run_eval(cm, "ser", manifest, str(out), batch_size=BATCH,
                                 resamples=200, progress=False)
    assert failed == 5  # 4 bad items + the line that is not JSON
    res = json.loads((out / "results.json").read_text())
    items = _items(out)
    assert res["n"] == 6 and res["labels"] == list(CFG.emotions)
    assert (out / "confusion.png").stat().st_size > 1000
    for bad, words in (("no_label", "emotion"), ("bad_label", "bored"), ("missing", "nope.wav"),
                       ("garbage", "bad clip")):
        assert words in items[bad]["error"], items[bad]
    assert "not a JSON object" in items["line11"]["error"]

    # the labels `chat` reports for the same clips
    chat_manifest = tmp_path / "chat.jsonl"
    chat_manifest.write_text("".join(json.dumps({"id": f"c{i}", "audio": p}) + "\n"
                                     for i, p in enumerate(paths)))
    run_chat(cm, str(chat_manifest), str(tmp_path / "answers.jsonl"), max_new_tokens=2,
             batch_size=BATCH, speech=False, progress=False)
    chat = {r["question_id"]: r["emotion"]["label"]
            for r in map(json.loads, (tmp_path / "answers.jsonl").read_text().splitlines())}
    assert {k: items[k]["prediction"] for k in chat} == chat

    truth = [items[f"c{i}"]["emotion"] for i in range(6)]
    assert truth[4] == "neutral"
    pred = [chat[f"c{i}"] for i in range(6)]
    assert res["unweighted_accuracy"] == pytest.approx(balanced_accuracy_score(truth, pred))
    assert np.sum(res["confusion"]) == 6
    for k in ("accuracy", "unweighted_accuracy", "macro_f1"):
        assert res["ci95"][k]["low"] <= res[k] <= res["ci95"][k]["high"]


# ---------------------------------------------------------------------------- spoken QA


class StubChat:
    """Canned replies (spoken QA reads only `respond`): answer i is reply i."""

    def __init__(self, replies):
        self.replies = replies

    def respond(self, audios, **kw):
        from freezeempath_jax.inference import Reply

        out = []
        for _ in audios:
            text = self.replies.pop(0)
            out.append(Reply(text=text, text_ids=[], units=[1, 2, 3] if kw["speech"] else None,
                             emotion="neutral", probabilities={}))
        return out


def test_spoken_qa_speech_to_text(clips, tmp_path):
    root, paths = clips
    rows = [{"id": "q1", "audio": paths[0], "answers": ["Paris"]},
            {"id": "q2", "audio": paths[1], "answers": ["George Washington", "Washington"]},
            {"id": "q3", "audio": paths[2], "answers": ["blue"]},
            {"id": "no_answers", "audio": paths[0]},
            {"id": "bad", "audio": str(root / "garbage.wav"), "answers": ["x"]}]
    chat = StubChat(["It is Paris.", "That was washington.", "Red, I think."])
    out = tmp_path / "qa"
    failed = evaluation.run_eval(chat, "spoken_qa", _manifest(tmp_path / "qa.jsonl", rows),
                                 str(out), batch_size=2, resamples=100, progress=False)
    res = json.loads((out / "results.json").read_text())
    items = _items(out)
    assert failed == 3 and res["n"] == 3 and res["accuracy"] == pytest.approx(2 / 3)
    assert [items[q]["correct"] for q in ("q1", "q2", "q3")] == [True, True, False]
    assert "answers" in items["no_answers"]["error"] and "bad clip" in items["bad"]["error"]


def espeak_stub_audio_fn(units, text):
    """TEST STUB for the units -> waveform decoder (not built yet): ignores the units and
    speaks the reply text with eSpeak NG."""
    from freezeempath_jax.data.synthetic import synthesize

    return synthesize(text, "neutral", seed=0, noise=False, jitter=False)


@pytest.mark.real_weights
def test_spoken_qa_speech_to_speech_with_espeak_stub(clips, tmp_path):
    """Speech-to-speech: the spoken reply (eSpeak stub) is transcribed by real tiny.en."""
    from test_checkpoints_real_whisper import tiny_en_dir

    from freezeempath_jax.inference.transcribe import WhisperASR

    asr = WhisperASR.load(tiny_en_dir(), batch_size=2)
    root, paths = clips
    rows = [{"id": "q1", "audio": paths[0], "answers": ["Paris"]},
            {"id": "q2", "audio": paths[1], "answers": ["seven"]}]
    chat = StubChat(["The capital of France is Paris.", "I do not know."])
    res = evaluation.evaluate_spoken_qa(chat, rows, mode="s2s", audio_fn=espeak_stub_audio_fn,
                                        asr=asr, batch_size=2, resamples=50, progress=False)
    assert "paris" in rows[0]["reply_transcript"].lower(), rows[0]
    assert [r["correct"] for r in rows] == [True, False] and res["accuracy"] == 0.5


# ------------------------------------------------------------------------------ empathy


class StubJudge:
    """Cycles through canned judge answers, one per prompt; remembers the prompts."""

    def __init__(self, answers):
        self.answers, self.prompts = answers, []

    def __call__(self, prompts):
        self.prompts += prompts
        return [self.answers[(len(self.prompts) - len(prompts) + i) % len(self.answers)]
                for i in range(len(prompts))]


def test_empathy_scores_and_per_item_errors(cm, clips, tmp_path):
    root, paths = clips
    rows = [{"id": "e0", "audio": paths[0], "transcript": "my code fails again",
             "emotion": "angry"},
            {"id": "e1", "audio": paths[1], "transcript": "how to reduce waste",
             "emotion": "sad"},
            {"id": "e2", "audio": paths[2], "transcript": "tell me about nasa",
             "emotion": "neutral"},
            {"id": "no_transcript", "audio": paths[3], "emotion": "happy"},
            {"id": "bad_clip", "audio": str(root / "garbage.wav"), "transcript": "x",
             "emotion": "sad"}]
    judge = StubJudge(["Helpful. [[8]]", "I cannot rate this.", "[[12]]"])
    out = tmp_path / "emp"
    failed = evaluation.run_eval(cm, "empathy", _manifest(tmp_path / "e.jsonl", rows), str(out),
                                 judge=judge, batch_size=BATCH, max_new_tokens=NEW,
                                 resamples=100, progress=False)
    res = json.loads((out / "results.json").read_text())
    items = _items(out)
    assert failed == 2 and res["n"] == 4  # bad clip + the non-JSON line
    assert "bad clip" in items["bad_clip"]["error"]
    # 3 quality prompts and 3 empathy prompts (no_transcript has neither): answers cycle
    # [[8]], unparseable, out of range -> one rating each, two unparseable each
    assert len(judge.prompts) == 6
    assert res["judge_unparseable"] == {"quality": 2, "empathy": 2}
    assert res["scores"]["quality"]["n"] == 1 and res["scores"]["quality"]["mean"] == 8
    assert items["e1"]["quality"] is None and "[[N]]" in items["e1"]["score_errors"]["quality"]
    nt = items["no_transcript"]
    assert "transcript" in nt["score_errors"]["quality"] and "similarity" in nt["score_errors"]
    assert "reply" in nt and "similarity" not in nt
    assert res["scores"]["similarity"]["n"] == 3
    assert "angry" in judge.prompts[3] and "my code fails again" in judge.prompts[0]
    # the reply scored is the chat's greedy reply to the same clip
    from freezeempath_jax.audio import load_audio

    chat = cm.respond([load_audio(paths[0])], max_new_tokens=NEW, temperature=0.0,
                      speech=False, pad_batch_to=BATCH)
    assert items["e0"]["reply"] == chat[0].text


def test_lm_judge_wiring(tok):
    """A real (tiny random) causal LM as judge: its answers are parsed, never guessed."""
    from freezeempath_jax.evaluation.judge import LMJudge, rate

    params = _random_params()["llm"]
    judge = LMJudge(CFG.llm, params, tok, chat_template="plain", batch_size=2,
                    max_new_tokens=4)
    res = rate(judge, ["rate this [[", "and this"])
    assert len(res) == 2 and all(isinstance(r["answer"], str) for r in res)
    assert all(r["rating"] == parse_rating(r["answer"]) for r in res)


# ----------------------------------------------------------------------------- ablation


def test_ablation_runs_every_setting(cm, clips, tmp_path):
    root, paths = clips
    rows = [{"id": f"a{i}", "audio": paths[i], "transcript": t, "emotion": e}
            for i, (t, e) in enumerate([("where is my order", "angry"),
                                        ("I lost my keys", "sad"),
                                        ("we won the game", "happy")])]
    rows.append({"id": "no_emotion", "audio": paths[3], "transcript": "hello"})
    out = tmp_path / "abl"
    failed = evaluation.run_eval(cm, "ablation", _manifest(tmp_path / "a.jsonl", rows),
                                 str(out), judge=StubJudge(["[[6]]", "meh"]), batch_size=BATCH,
                                 max_new_tokens=NEW, resamples=100, progress=False)
    res = json.loads((out / "results.json").read_text())
    items = _items(out)
    assert failed == 2 and res["n"] == 3 and "emotion" in items["no_emotion"]["error"]
    assert list(res["table"]) == list(evaluation.ablation.SETTINGS)
    ref = res["table"]["transcript_true_label"]
    assert ref["similarity"]["mean"] == 1.0
    for row in res["table"].values():
        assert set(row) == {"similarity", "acknowledges", "empathy", "judge_unparseable"}
        assert row["similarity"]["n"] == 3
    table = (out / "ablation.md").read_text()
    assert "5. speech_zero_emotion" in table and "6. speech_shuffled_emotion" in table
    # setting 1 is the chat's own greedy reply
    from freezeempath_jax.audio import load_audio

    chat = cm.respond([load_audio(paths[1])], max_new_tokens=NEW, temperature=0.0,
                      speech=False, pad_batch_to=BATCH)
    assert items["a1"]["replies"]["speech_feature"] == chat[0].text
    assert all(len(set(items[f"a{i}"]["replies"])) == 6 for i in range(3))


# ---------------------------------------------------------------------------- retention


def test_retention_identical_and_changed(cm, tok, tmp_path):
    rows = [{"id": "t0", "prompt": "What is the capital of France?"},
            {"id": "t1", "text": "Name three colours."},
            {"id": "t2", "instruction": "Say hello."},
            {"id": "empty"}]
    manifest = _manifest(tmp_path / "r.jsonl", rows)
    out = tmp_path / "ret"
    failed = evaluation.run_eval(cm, "retention", manifest, str(out),
                                 llm=(CFG.llm, cm.params["llm"], tok), batch_size=BATCH,
                                 max_new_tokens=NEW, progress=False)
    res = json.loads((out / "results.json").read_text())
    assert failed == 2 and res["n"] == 3 and res["n_identical"] == 3
    assert "prompt" in _items(out)["empty"]["error"]

    changed = jax.tree_util.tree_map(lambda x: x, cm.params["llm"])
    changed["norm"] = {"scale": -changed["norm"]["scale"]}  # a different LLM: logits negated
    recs = [dict(r) for r in rows[:3]]
    res2 = evaluation.evaluate_retention(cm, recs, (CFG.llm, changed, tok), batch_size=BATCH,
                                         max_new_tokens=NEW, progress=False)
    assert res2["n_identical"] < 3 and res2["differing_ids"]


# --------------------------------------------------------------------------------- tfds


def test_ser_from_tfds(cm, tmp_path):
    from freezeempath_jax.data.builders import prepare

    prepare("synthetic", config="tiny", data_dir=str(tmp_path / "tfds"))
    out = tmp_path / "tf"
    failed = evaluation.run_eval(cm, "ser", "tfds:synthetic/tiny", str(out),
                                 data_dir=str(tmp_path / "tfds"), split="train",
                                 batch_size=BATCH, resamples=50, progress=False)
    res = json.loads((out / "results.json").read_text())
    assert failed == 0 and res["n"] >= 1 and np.sum(res["confusion"]) == res["n"]
    joined = evaluation.read_tfds("synthetic/tiny", "train+train", str(tmp_path / "tfds"))
    assert len(joined) == 2 * 25
    with pytest.raises(ValueError, match="no split .test."):
        evaluation.read_tfds("synthetic/tiny", "test", str(tmp_path / "tfds"))
    with pytest.raises(FileNotFoundError, match="not prepared"):
        evaluation.read_tfds("synthetic/small", "test", str(tmp_path / "tfds"))


def test_cli_parses_eval_and_transcribe():
    from freezeempath_jax.cli import build_parser

    a = build_parser().parse_args(["eval", "--model", "m", "--task", "ablation", "--input",
                                   "x.jsonl", "--output", "d", "--judge", "j"])
    assert (a.task, a.judge, a.resamples) == ("ablation", "j", 1000)
    t = build_parser().parse_args(["transcribe", "--model", "w", "--input", "a.wav",
                                   "--output", "o.jsonl"])
    assert t.batch_size == 8
