"""Issue 17, chat side: nothing one manifest line holds ends the run - undecodable bytes,
JSON that is not an object, NaN, repeated ids, an out-of-memory while reading one clip or
non-finite probabilities each become that line's error record and the rest are answered;
the output is strict JSON; a bad --output (a folder, the input itself, under a file) is one
`error:` line and exit 2 before any model loads.

The model is a stand-in `ChatModel` whose `respond` answers instantly (what is tested here
is the command around the model, not generation).
"""

import json
import math

import numpy as np
import pytest
import soundfile as sf

from freezeempath_jax import cli
from freezeempath_jax.inference import cli as chat_cli
from freezeempath_jax.inference.chat import ChatModel, Reply
from freezeempath_jax.models.configs import EMOTIONS


class StubChat(ChatModel):
    """Replies "ok" to every clip; `nan_on` lists clip lengths (samples) whose emotion
    probabilities come back NaN, as a diverged model would give."""

    def __init__(self, nan_on=()):  # no parameters, nothing to compile
        self.nan_on = set(nan_on)
        self.answered = 0

    def respond(self, audios, *args, **kwargs):
        self.answered += len(audios)
        out = []
        for a in audios:
            p = math.nan if len(a) in self.nan_on else 1.0 / len(EMOTIONS)
            out.append(Reply(text="ok", text_ids=[1], units=[3, 4], emotion=EMOTIONS[0],
                             probabilities={e: p for e in EMOTIONS}))
        return out


def wav(path, seconds=0.5):
    n = int(16000 * seconds)
    sf.write(path, 0.1 * np.random.RandomState(n).randn(n).astype(np.float32), 16000)
    return str(path)


def strict_lines(path):
    """Output lines, parsed the way a strict consumer would (NaN / Infinity rejected)."""
    def reject(name):
        raise AssertionError(f"output holds {name}")
    return [json.loads(x, parse_constant=reject) for x in open(path).read().splitlines()]


def test_bad_lines_are_error_records_and_the_rest_answered(tmp_path, monkeypatch):
    a, b, c = wav(tmp_path / "a.wav"), wav(tmp_path / "b.wav"), wav(tmp_path / "c.wav")
    oom = wav(tmp_path / "oom.wav")
    nan_clip = wav(tmp_path / "nan.wav", seconds=0.25)
    lines = [
        json.dumps({"id": "a", "audio": a}).encode(),
        b'{"id": "bad", "audio": "\xff\xfe.wav"}',  # not UTF-8
        b'[1, 2]',
        b'"just a string"',
        b'null',
        b'{"id": NaN, "audio": "x.wav"}',
        json.dumps({"id": "b", "audio": b}).encode(),
        json.dumps({"id": "a", "audio": c}).encode(),  # repeats line 1's id
        json.dumps({"id": "oom", "audio": oom}).encode(),
        json.dumps({"id": "nan", "audio": nan_clip}).encode(),
        json.dumps({"id": "c", "audio": c}).encode(),
        b'{"id": "\\ud800", "audio": "gone.wav"}',  # a lone surrogate: not writable as UTF-8
    ]
    manifest = tmp_path / "q.jsonl"
    manifest.write_bytes(b"\n".join(lines) + b"\n")

    real_load = chat_cli.load_audio

    def load(path, *args, **kwargs):
        if path == oom:
            raise MemoryError()
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(chat_cli, "load_audio", load)
    model = StubChat(nan_on={4000})
    out = tmp_path / "answers.jsonl"
    failed = chat_cli.run_chat(model, str(manifest), str(out), batch_size=3, progress=False)

    rows = strict_lines(out)
    m = str(manifest)
    assert [r["question_id"] for r in rows] == [
        "a", "line2", "line3", "line4", "line5", "line6", "b", "a", "oom", "nan", "c", "\ud800"]
    errors = {i: r["error"] for i, r in enumerate(rows, 1) if "error" in r}
    assert errors == {
        2: f"{m}:2: not UTF-8 text (byte 24)",
        3: f'{m}:3: expected a JSON object {{"id": ..., "audio": ...}}, got list',
        4: f'{m}:4: expected a JSON object {{"id": ..., "audio": ...}}, got str',
        5: f'{m}:5: expected a JSON object {{"id": ..., "audio": ...}}, got null',
        6: f"{m}:6: not JSON (non-finite number NaN is not JSON)",
        8: f"{m}:8: duplicate id 'a', first used on line 1 (answered there only)",
        9: f"{oom}: MemoryError",
        10: "the model's emotion probabilities are not finite (NaN/inf): no answer written",
        12: errors[12],
    }
    assert "gone.wav" in errors[12]
    for i in (2, 3, 4, 5, 6):
        assert rows[i - 1]["audio"] is None
    assert failed == len(errors)
    for i in (1, 7, 11):
        assert rows[i - 1]["prediction"] == "ok" and rows[i - 1]["prediction_units"] == "3 4"
    assert model.answered == 4  # a, b, nan, c: the duplicate and the failed read never reach it


def test_output_is_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    a = wav(tmp_path / "a.wav")
    manifest = tmp_path / "q.jsonl"
    manifest.write_text(json.dumps({"id": "a", "audio": a}) + "\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(chat_cli, "load_chat_model",
                        lambda *a, **k: pytest.fail("the model was loaded"))

    def chat(output, input_=str(manifest)):
        code = cli.main(["chat", "--model", "configs/tiny.py", "--input", input_,
                         "--output", output])
        return code, capsys.readouterr().err.strip()

    out = str(tmp_path / "folder")
    assert chat(out) == (2, f"error: --output {out!r} is a directory; give a file path")
    out = str(tmp_path / "afile" / "answers.jsonl")
    assert chat(out) == (2, f"error: --output {out!r}: {str(tmp_path / 'afile')!r} is a file, "
                            "not a folder")
    same = str(tmp_path / "." / "q.jsonl")  # another spelling of the input
    assert chat(same) == (2, f"error: --output {same!r} is the input file; writing answers "
                             "there would destroy the questions: choose another path")
    assert manifest.read_text().startswith('{"id": "a"')
    missing = str(tmp_path / "none.jsonl")
    assert chat(str(tmp_path / "o.jsonl"), missing) == (
        2, f"error: --input {missing!r} does not exist")


def test_replacing_an_existing_output_is_said(tmp_path, caplog):
    a = wav(tmp_path / "a.wav")
    out = tmp_path / "answers.jsonl"
    out.write_text("old\n")
    assert chat_cli.run_chat(StubChat(), a, str(out), progress=False) == 0
    assert f"replacing the existing file {out}" in caplog.text
    assert strict_lines(out)[0]["question_id"] == "a"
