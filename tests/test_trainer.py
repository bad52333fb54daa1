"""The training loop end to end (`train.trainer`): it learns, it resumes bit-identically after
SIGKILL, it saves and exits on SIGTERM, it stops on NaN keeping the last good checkpoint, and
it logs what it promises.

The learning tests run the tiny model of `configs/tiny.py` on the synthetic eSpeak corpus.
Stage 2a must reach >= 90% SER accuracy on held-out clips. Stage 1 needs a frozen LLM whose
next-token distributions depend on its input: a random tiny LM initialised like a large one
is almost uniform (CE ~ ln V whatever the projector does), so its output head and embeddings
are scaled up first - what a trained LLM looks like to the projector. The process-level
tests drive `python -m freezeempath_jax.cli train ...`, the README command line.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from freezeempath_jax.checkpoints import load_trained_params
from freezeempath_jax.train import checkpointing, records, trainer
from freezeempath_jax.train.metrics import NonFiniteError, read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


def config_from(path, **overrides):
    """A configs/*.py file (`file.py:arg` allowed) with `section.key` overrides, as the
    command line would set them."""
    from freezeempath_jax.inference import load_config_file

    cfg = load_config_file(path)
    with cfg.unlocked():
        for key, value in overrides.items():
            node = cfg
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    cfg.train.progress = False
    return cfg


def tiny_config(**overrides):
    return config_from(TINY, **overrides)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """One synthetic corpus (40 clips per emotion: 160 train / 40 held out) for every run."""
    return str(tmp_path_factory.mktemp("corpus"))


# ---------------------------------------------------------------------------------------------
# It learns


def test_stage_2a_learns_emotions_on_held_out_clips(tmp_path, corpus_dir):
    cfg = tiny_config(**{"stage": "2a", "data.dir": corpus_dir, "data.num_per_emotion": 40,
                         "train.eval_batches": 0, "train.eval_at_start": True})
    tic = time.perf_counter()
    out = trainer.train(cfg, str(tmp_path))
    seconds = time.perf_counter() - tic
    evals = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "eval"]
    print(f"stage 2a: {seconds:.0f} s; held-out SER accuracy by step: "
          f"{[(r['step'], round(r['ser_accuracy'], 3)) for r in evals]}")
    assert out["step"] == 300
    assert evals[0]["step"] == 0 and evals[0]["ser_accuracy"] < 0.5  # untrained: near chance
    assert out["eval/num_ser_examples"] == 40  # every held-out clip, none seen in training
    assert out["eval/ser_accuracy"] >= 0.9

    # the saved checkpoint is the trained model: the chat model built from the workdir
    # classifies the held-out clips as well as the trainer's evaluation did
    from freezeempath_jax import inference as chat
    from freezeempath_jax.data.manifests import read_manifest
    from freezeempath_jax.evaluation.ser import evaluate_ser
    from freezeempath_jax.models.configs import EMOTIONS
    held_out = (read_manifest(os.path.join(corpus_dir, "validation.jsonl"))
                + read_manifest(os.path.join(corpus_dir, "test.jsonl")))
    bot = chat.load_chat_model(str(tmp_path))
    ser = evaluate_ser(bot, held_out, progress=False)
    assert ser["n"] == 40 and ser["labels"] == list(EMOTIONS)
    assert abs(ser["accuracy"] - out["eval/ser_accuracy"]) <= 0.05, ser


def test_ser_warm_up_learns_without_the_llm(tmp_path, corpus_dir):
    """`loss.objective=ser_ce` (the demo's stage 2a warm-up): the SER head's CE alone, on
    cached encoder outputs, learns the held-out clips; no LLM term is computed."""
    cfg = tiny_config(**{"stage": "2a", "loss.objective": "ser_ce", "data.dir": corpus_dir,
                         "data.num_per_emotion": 40, "train.eval_batches": 0,
                         "train.eval_at_start": True})
    out = trainer.train(cfg, str(tmp_path))
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    evals = [r for r in rows if r["split"] == "eval"]
    print(f"SER warm-up: held-out SER accuracy by step: "
          f"{[(r['step'], round(r['ser_accuracy'], 3)) for r in evals]}")
    assert all("loss_ce" not in r and "token_accuracy" not in r for r in rows)
    assert evals[0]["step"] == 0 and evals[0]["ser_accuracy"] < 0.5
    assert out["eval/num_ser_examples"] == 40
    assert out["eval/ser_accuracy"] >= 0.9


def sharp_tiny_llm(path):
    """The tiny config's LLM, randomly initialised, with its embeddings and output head scaled
    x25 so that its next-token distributions are peaked (saved in our converted format)."""
    from freezeempath_jax import checkpoints
    from freezeempath_jax.models import CausalLM, presets

    lm = presets.TINY.llm
    p = nn.meta.unbox(CausalLM(lm).init(jax.random.key(1),
                                        input_ids=jnp.zeros((1, 1), jnp.int32))["params"])
    p["lm_head"]["kernel"] = p["lm_head"]["kernel"] * 25.0
    p["embed_tokens"]["embedding"] = p["embed_tokens"]["embedding"] * 25.0
    checkpoints.save_params(str(path), p, config=lm, kind="llm")
    return str(path)


def test_stage_1_lowers_the_distillation_loss(tmp_path, corpus_dir):
    llm = sharp_tiny_llm(tmp_path / "llm")
    cfg = tiny_config(**{"stage": "1", "data.dir": corpus_dir, "data.num_per_emotion": 40,
                         "init.llm": llm, "train.eval_batches": 0,
                         "train.eval_at_start": True})
    out = trainer.train(cfg, str(tmp_path / "run"))
    evals = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["split"] == "eval"]
    first, last = evals[0], evals[-1]
    print(f"stage 1 held-out CE on the frozen LLM's own replies: {first['loss']:.3f} at step 0 "
          f"-> {last['loss']:.3f} at step {last['step']} (x{first['loss'] / last['loss']:.2f}); "
          f"token accuracy {first['token_accuracy']:.3f} -> {last['token_accuracy']:.3f}")
    assert first["step"] == 0 and last["step"] == out["step"] == 200
    assert last["loss"] * 2.0 < first["loss"]
    assert last["token_accuracy"] > first["token_accuracy"] + 0.2


@pytest.mark.parametrize("config,stage,objective,expect", [
    ("tiny.py", "2b", None, ("loss_ce", "loss_ser")),
    ("tiny.py", "3a", None, ("loss_ce",)),
    ("tiny.py", "1", "distill_kl", ("loss_kl",)),
    ("blsp_emo.py:tiny", "1", None, ("loss_ce",)),
    ("blsp_emo.py:tiny", "2b", None, ("loss_ce", "loss_ser")),
    ("re_llm.py:tiny", "2a", None, ("loss_ce", "loss_ser", "loss_attr")),
])
def test_every_recipe_trains(tmp_path, small_corpus_dir, config, stage, objective, expect):
    """Each stage of each recipe config (FreezeEmpath 2b/3a and the stage 1 KL variant,
    BLSP-Emo's conv adapter, RE-LLM's attribute head) runs through the trainer on the tiny
    model on synthetic clips, with finite loss terms that go down."""
    over = {"stage": stage, "data.dir": small_corpus_dir, "data.num_per_emotion": 8,
            "train.steps": 40, "train.log_every": 10, "train.eval_batches": 1}
    if objective:
        over["loss.objective"] = objective
    cfg = config_from(os.path.join(REPO, "configs", config), **over)
    out = trainer.train(cfg, str(tmp_path))
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert out["step"] == 40
    for key in expect:
        assert all(np.isfinite(r[key]) for r in rows), key
    assert rows[-1]["loss"] < rows[0]["loss"]


# ---------------------------------------------------------------------------------------------
# Logs


def test_metrics_and_tensorboard_are_written(tmp_path):
    cfg = tiny_config(**{"stage": "2a", "data.kind": "noise", "data.num_per_emotion": 8,
                         "train.steps": 20, "train.log_every": 5, "train.batch_size": 8,
                         "train.ckpt_every": 10})
    trainer.train(cfg, str(tmp_path))
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
    for key in ("loss", "loss_ce", "loss_ser", "ser_accuracy", "token_accuracy", "grad_norm",
                "learning_rate", "samples_per_sec", "tokens_per_sec", "model_tflops_per_sec"):
        assert all(np.isfinite(r[key]) for r in train_rows), key
    assert train_rows[-1]["model_tflops_per_sec"] > 0
    lrs = [r["learning_rate"] for r in train_rows]
    assert lrs[-1] < lrs[0]  # cosine decay
    events = os.listdir(tmp_path / "tensorboard")
    assert any(e.startswith("events.out.tfevents") for e in events)
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [10, 20]


# ---------------------------------------------------------------------------------------------
# NaN guard


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    from freezeempath_jax.models import presets
    from freezeempath_jax.train import batches as B_

    recs = records.noise_records(24, 0, presets.TINY.whisper.n_mels, 1.0, presets.TINY.emotions)
    bs, seed = 4, 0
    # put the poisoned clip where the seeded order first draws it in the 4th batch or later
    order = B_.MemorySource(list(range(len(recs))), bs, seed)
    first_batch = {}
    for b in range(len(recs) // bs):
        for j in next(order):
            first_batch.setdefault(j, b + 1)
    bad = next(j for j, b in first_batch.items() if b >= 4)
    recs[bad] = dict(recs[bad], mel=np.full_like(recs[bad]["mel"], np.nan))
    cfg = tiny_config(**{"stage": "2a", "data.kind": "memory", "train.steps": 50,
                         "train.batch_size": bs, "data.shuffle_seed": seed,
                         "train.ckpt_every": 1, "train.log_every": 1, "train.keep": 50,
                         "train.eval_every": 1000})
    clean = [r for i, r in enumerate(recs) if i != bad]
    with pytest.raises(NonFiniteError) as err:
        trainer.train(cfg, str(tmp_path), train_records=recs, eval_records=clean[:4])
    failed = first_batch[bad]
    assert f"step {failed}" in str(err.value)
    assert f"last good checkpoint is step {failed - 1}" in str(err.value)
    ck = checkpointing.Checkpointer(str(tmp_path), async_save=False)
    try:
        assert ck.latest_step() == failed - 1  # the NaN state was never saved
    finally:
        ck.close()
    params, _ = load_trained_params(str(tmp_path))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------------------------------
# Preemption and crashes (separate processes, the README command line)


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """Environment of the training processes: one persistent compilation cache, so the
    second and third process of a test reuse the first one's compiled steps (what
    JAX_COMPILATION_CACHE_DIR does for restarts in real runs too)."""
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def cli_train(workdir, *args):
    """`python -m freezeempath_jax.cli train --config configs/tiny.py ... --workdir W`."""
    return [sys.executable, "-m", "freezeempath_jax.cli", "train", "--config", TINY,
            "--config.train.progress=False", *args, "--workdir", str(workdir)]


def checkpoint_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def wait_for(predicate, proc, timeout=240.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with code {proc.returncode}:\n"
                                 + proc.stderr.read().decode()[-3000:])
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out")


def run_ok(cmd, env):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def small_corpus_dir(tmp_path_factory):
    """8 clips per emotion: enough for the process-level tests, quick to encode per run."""
    return str(tmp_path_factory.mktemp("small_corpus"))


@pytest.mark.parametrize("input_path", ["memory", "stream"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, small_corpus_dir, cli_env,
                                                         input_path):
    """Killed hard after its first checkpoint, then started again with the same command, a
    run ends with exactly the parameters of a run that was never interrupted: the train
    state, the RNG and the data position (in-memory source, or grain's iterator) resume."""
    args = ["--config.stage=2a", "--config.train.steps=30", "--config.train.ckpt_every=10",
            "--config.train.log_every=5", f"--config.data.dir={small_corpus_dir}",
            "--config.data.num_per_emotion=8"]
    if input_path == "stream":
        args += ["--config.data.stream=True", "--config.data.cache_encoder=False"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_ok(cli_train(whole, *args), cli_env)

    proc = subprocess.Popen(cli_train(broken, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cli_env)
    wait_for(lambda: checkpoint_steps(broken), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = checkpoint_steps(broken)[-1]
    assert killed_at < 30, "the run finished before it could be killed"
    resumed = run_ok(cli_train(broken, *args), cli_env)
    assert resumed["step"] == 30

    a, _ = load_trained_params(str(whole))
    b, _ = load_trained_params(str(broken))
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=jax.tree_util.keystr(path))
    # the resumed log reads as one run: every logged step once, in order
    steps = [r["step"] for r in read_jsonl(broken / "metrics.jsonl") if r["split"] == "train"]
    assert steps == [5, 10, 15, 20, 25, 30]


def test_sigterm_saves_and_exits_cleanly(tmp_path, cli_env):
    args = ["--config.stage=2a", "--config.data.kind=noise", "--config.train.steps=100000",
            "--config.train.ckpt_every=100000", "--config.train.log_every=5"]
    proc = subprocess.Popen(cli_train(tmp_path, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cli_env)
    metrics = tmp_path / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-3000:]
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["preempted"] is True and 5 <= result["step"] < 100000
    assert checkpoint_steps(tmp_path) == [result["step"]]


def test_train_help_lists_the_flags(capsys):
    from freezeempath_jax import cli

    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--workdir" in out and "--config.stage" in out


def test_manifest_stream_skips_bad_items_and_keeps_training(tmp_path, small_corpus_dir):
    """A manifest run streams through grain: a missing clip is dropped when the manifest is
    read (skip_report_train.json), a corrupt one when its batch is made (counted in the log
    as skipped_records); neither stops training."""
    from freezeempath_jax.data import synthetic
    from freezeempath_jax.data.manifests import read_manifest

    if not os.path.exists(os.path.join(small_corpus_dir, "train.jsonl")):
        synthetic.build_synthetic_corpus(small_corpus_dir, 8, ("en",), 0, (0.8, 0.1, 0.1),
                                         progress=False)
    recs = read_manifest(os.path.join(small_corpus_dir, "train.jsonl"))
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    lines = [{"id": r["id"], "audio": r["audio"], "transcript": r["transcript"],
              "emotion": r["emotion"]} for r in recs]
    lines.append({"id": "corrupt", "audio": str(corrupt), "transcript": "hi", "emotion": "sad"})
    lines.append({"id": "missing", "audio": str(tmp_path / "gone.wav"), "transcript": "hi",
                  "emotion": "sad"})
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    steps = 2 * (len(lines) - 1) // 8  # two epochs of batches of 8: the corrupt clip is drawn
    cfg = tiny_config(**{"stage": "2a", "data.kind": "manifest", "data.train": str(manifest),
                         "data.audio_seconds": 3.0, "data.cache_encoder": False,
                         "train.batch_size": 8, "train.steps": steps,
                         "train.log_every": steps, "train.eval_batches": 0})
    out = trainer.train(cfg, str(tmp_path / "run"))
    assert out["step"] == steps and np.isfinite(out["train/loss"])
    report = json.loads((tmp_path / "run" / "skip_report_train.json").read_text())
    assert report["skipped"] == {"missing_audio": 1}
    assert out["train/skipped_records"] >= 1  # the corrupt clip, each time it was drawn


def test_two_fresh_processes_log_identical_losses(tmp_path, cli_env):
    """The same config run twice from scratch, each process building its own synthetic
    corpus, logs the same losses at every step (the corpus and everything after it are a
    function of the seeds)."""
    losses = []
    for run in ("a", "b"):
        work = tmp_path / run
        run_ok(cli_train(work, "--config.stage=2a", "--config.train.steps=3",
                         "--config.train.batch_size=8", "--config.train.log_every=1",
                         "--config.data.num_per_emotion=6", "--config.train.eval_every=3"),
               cli_env)
        rows = [r for r in read_jsonl(work / "metrics.jsonl") if r["split"] == "train"]
        losses.append([(r["step"], r["loss"], r["loss_ser"]) for r in rows])
        assert (work / "data" / "corpus.json").exists()  # each run built its own corpus
    assert len(losses[0]) == 3
    assert losses[0] == losses[1]
