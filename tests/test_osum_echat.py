"""The OSUM-EChat recipe (configs/osum_echat.py) end to end.

- The gender head learns on the synthetic eSpeak corpus and generalises to VOICES it never
  heard: two of the eight English voices (one female, one male: en-029+f4, en-gb-x-rp+m4)
  are held out entirely, every clip of theirs is evaluated, none trained on (chance 50%).
- `configs/osum_echat.py:small` trains on the CPU demo's real small models (Whisper tiny.en
  + SmolLM2-135M-Instruct) through every stage for a few steps (stage 1, the SER + gender
  warm-up, 2a, 2b with dual thinking), and the trained checkpoint chats with dual thinking
  on (the default it was trained with) and off, with different replies.
"""

import os
import time

import pytest

from freezeempath_jax.inference import load_config_file
from freezeempath_jax.train import trainer
from freezeempath_jax.train.metrics import read_jsonl
from freezeempath_jax.train.records import _synthetic_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "osum_echat.py")
HELD_OUT_VOICES = ("en-029+f4", "en-gb-x-rp+m4")


def _config(size, **overrides):
    cfg = load_config_file(f"{CONFIG}:{size}")
    with cfg.unlocked():
        for key, value in overrides.items():
            node = cfg
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
        cfg.train.progress = False
    return cfg


def split_by_voice(cfg, workdir):
    """Every clip of the synthetic corpus (all three splits), split by voice."""
    train, held = _synthetic_records(cfg, workdir)
    every = train + held
    return ([r for r in every if r["voice"] not in HELD_OUT_VOICES],
            [r for r in every if r["voice"] in HELD_OUT_VOICES])


def test_gender_head_learns_on_held_out_voices(tmp_path):
    cfg = _config("tiny", **{"stage": "2a", "loss.objective": "ser_ce",
                             "data.dir": str(tmp_path / "corpus"), "data.num_per_emotion": 40,
                             "train.eval_batches": 0, "train.eval_at_start": True})
    train, held = split_by_voice(cfg, str(tmp_path))
    assert {r["gender"] for r in held} == {"female", "male"}
    assert not {r["voice"] for r in train} & set(HELD_OUT_VOICES)
    tic = time.perf_counter()
    out = trainer.train(cfg, str(tmp_path / "run"), train_records=train, eval_records=held)
    evals = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["split"] == "eval"]
    print(f"gender head, {len(held)} clips of 2 held-out voices, {time.perf_counter() - tic:.0f}"
          f" s: gender accuracy by step {[(r['step'], round(r['gender_accuracy'], 3)) for r in evals]}"
          f"; SER {out['eval/ser_accuracy']:.3f}")
    assert evals[0]["step"] == 0 and evals[0]["gender_accuracy"] < 0.65  # untrained
    assert out["eval/num_gender_examples"] == len(held)
    assert out["eval/gender_accuracy"] >= 0.8  # chance: 0.5
    assert out["eval/ser_accuracy"] >= 0.7  # the SER head still learns beside it


def test_tiny_2b_trains_with_dual_thinking_and_the_gender_head(tmp_path):
    """Stage 2b of the tiny recipe: dual-thinking rows (analysis in the prompt, the frozen
    LLM's reply after it as target), 2a rows mixed in, the gender head's CE beside SER's."""
    cfg = _config("tiny", **{"stage": "2b", "data.dir": str(tmp_path / "corpus"),
                             "data.num_per_emotion": 8, "train.steps": 30,
                             "train.log_every": 10, "train.eval_batches": 1})
    out = trainer.train(cfg, str(tmp_path / "run"))
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert out["step"] == 30
    for key in ("loss_ce", "loss_ser", "loss_gender"):
        assert all(r[key] == r[key] for r in rows), key  # finite, present
    assert rows[-1]["loss"] < rows[0]["loss"]


# The small recipe, a few steps per stage: (stage name, config stage, objective, steps).
SMALL_STAGES = (("1", "1", None, 2), ("ser", "2a", "ser_ce", 40), ("2a", "2a", None, 2),
                ("2b", "2b", None, 2))


@pytest.mark.real_weights
@pytest.mark.slow
def test_small_config_trains_end_to_end_and_chats_with_dual_thinking(tmp_path):
    from freezeempath_jax.real_models import MissingModelError, smollm2_gguf, whisper_tiny_en_ct2

    try:
        smollm2_gguf(), whisper_tiny_en_ct2()
    except MissingModelError as e:
        pytest.skip(str(e))
    from freezeempath_jax.data.manifests import read_manifest
    from freezeempath_jax.inference import load_chat_model
    from freezeempath_jax.audio import load_audio

    tic = time.perf_counter()
    done, results = [], {}
    for name, stage, objective, steps in SMALL_STAGES:
        over = {"stage": stage, "data.dir": str(tmp_path / "data"),
                "data.cache_dir": str(tmp_path / "cache"), "data.num_per_emotion": 8,
                "init.previous": tuple(done), "train.steps": steps, "train.eval_batches": 1}
        if objective:
            over["loss.objective"] = objective
        cfg = _config("small", **over)
        workdir = str(tmp_path / f"stage_{name}")
        results[name] = trainer.train(cfg, workdir)
        done.append(workdir)
    seconds = time.perf_counter() - tic
    print(f"osum_echat:small, stages {[s[0] for s in SMALL_STAGES]} in {seconds:.0f} s; "
          f"gender accuracy after the warm-up (held-out clips of the corpus split): "
          f"{results['ser']['eval/gender_accuracy']:.3f}")
    for name, out in results.items():
        assert out["step"] == dict((s[0], s[3]) for s in SMALL_STAGES)[name]
        assert all(v == v for k, v in out.items() if isinstance(v, float)), (name, out)
    assert "eval/gender_accuracy" in results["2a"] and "train/loss_gender" in results["2b"]

    held = read_manifest(str(tmp_path / "data" / "test.jsonl"))[:3]
    clips = [load_audio(r["audio"]) for r in held]
    bot = load_chat_model(str(tmp_path / "stage_2b"))
    assert bot.dual_thinking  # the checkpoint's default: it was trained with dual thinking
    on = bot.respond(clips, max_new_tokens=12, temperature=0.0)
    off = load_chat_model(str(tmp_path / "stage_2b"), dual_thinking=False).respond(
        clips, max_new_tokens=12, temperature=0.0)
    for a, b in zip(on, off):
        assert a.analysis and a.analysis.startswith("(The user sounds like a")
        assert b.analysis is None and a.cues == b.cues and "gender" in a.cues
    assert [r.text for r in on] != [r.text for r in off]
