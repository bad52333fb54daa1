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
