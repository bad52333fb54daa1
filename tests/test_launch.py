"""The launch layer: AOT memory plan, the absl entry point, and the two cluster scripts.

- `train.plan` compiles the tiny model's step from abstract inputs on 8 fake devices (FSDP)
  and on one device; sharding must shrink what each device holds. The body runs in a
  subprocess because the fake device count has to be set before jax starts (as in
  test_train_sharding.py).
- `launch/train.py` trains two steps of the tiny model and leaves a checkpoint.
- `launch/tpu_pod.sh` and `launch/gpu_slurm.sh` parse, and, run against stand-in `gcloud`,
  `scontrol` and `srun` commands, deliver the arguments intact and the environment that
  `train.step.maybe_initialize_distributed` reads.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"

PLAN_SCRIPT = textwrap.dedent("""
    import json
    import jax
    from freezeempath_jax.train import plan

    assert jax.device_count() == 8, jax.devices()
    config = plan.load_config("configs/tiny.py", stage="2a")
    rows = plan.plan(config, plan.parse_meshes("8:1x-1x1,1x1x1"), keep_going=False)
    print("RESULT" + json.dumps([r.as_dict() for r in rows]))
    print(plan.markdown_table(rows))
""")


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def tiny_plan():
    env = _env(XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                          " --xla_force_host_platform_device_count=8").strip())
    proc = subprocess.run([sys.executable, "-c", PLAN_SCRIPT], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"plan failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1]
    rows = {r["mesh"]: r for r in json.loads(line[len("RESULT"):])}
    return rows, proc.stdout


def test_plan_compiles_and_reports_memory(tiny_plan):
    rows, out = tiny_plan
    assert set(rows) == {"1x8x1", "1x1x1"}
    for r in rows.values():
        assert r["error"] == ""
        for key in ("argument", "output", "temp", "total", "state", "frozen", "batch"):
            assert r[key] > 0, (key, r)
        assert r["compile_s"] > 0
        # The donated train state comes back in place: its bytes are the aliased outputs.
        assert r["alias"] == r["state"], r
        # Inputs the step never reads (stage 2a: the speech decoder) are dropped from the
        # arguments but still held, so the sharding prediction is at least XLA's count.
        assert r["state"] + r["frozen"] + r["batch"] >= r["argument"]
        assert r["total"] >= r["argument"] + r["temp"]
    assert "| 8 | 1x8x1 |" in out and "| 1 | 1x1x1 |" in out


def test_plan_fsdp_shards_what_each_device_holds(tiny_plan):
    rows, _ = tiny_plan
    one, eight = rows["1x1x1"], rows["1x8x1"]
    assert eight["trainable_params"] == one["trainable_params"]
    # Parameters over fsdp and the batch over data x fsdp: a lost sharding would keep the
    # 8-device arguments near the single-device size (the tiny model has a few replicated
    # leaves whose dims 8 does not divide, hence 4x rather than 8x).
    assert eight["argument"] * 4 < one["argument"], (eight, one)
    assert eight["frozen"] * 4 < one["frozen"]
    assert eight["batch"] * 8 == one["batch"]
    assert eight["temp"] < one["temp"]


def test_parse_meshes():
    from freezeempath_jax.train.plan import MeshSpec, parse_meshes
    assert parse_meshes("8:1x8x1, 64:1x-1x1,2x64x2") == [
        MeshSpec(8, (1, 8, 1)), MeshSpec(64, (1, 64, 1)), MeshSpec(256, (2, 64, 2))]
    for bad in ("8:1x4x1", "1x-1x1", "1x8", "8:1x-1x-1", "", "a:1x1x1"):
        with pytest.raises(ValueError):
            parse_meshes(bad)


def test_plan_reports_a_batch_that_does_not_split():
    from freezeempath_jax.train.plan import MeshSpec, load_config, plan
    config = load_config(str(REPO / "configs" / "tiny.py"), stage="2a", batch_size=6)
    # 6 rows over 4 batch shards: refused before any tracing (devices are never touched).
    (row,) = plan(config, [MeshSpec(4, (1, 4, 1))], devices=[object()] * 4)
    assert "does not split over 4 batch shards" in row.error


def test_train_entry_point_runs_and_checkpoints(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(LAUNCH / "train.py"), "--config", "configs/tiny.py",
         "--config.data.kind=noise", "--config.train.steps=2", "--config.train.progress=False",
         f"--workdir={workdir}"],
        capture_output=True, text=True, env=_env(FREEZEEMPATH_NO_DISTRIBUTED="1"), cwd=REPO,
        timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ckpts = workdir / "checkpoints"
    assert ckpts.is_dir() and any(ckpts.iterdir()), sorted(p.name for p in workdir.iterdir())
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["step"] == 2


def test_train_entry_point_help_lists_flags():
    proc = subprocess.run([sys.executable, str(LAUNCH / "train.py"), "--help"],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    # absl exits 1 after printing help; what matters is that the trainer's flags are listed.
    assert "--config" in proc.stdout and "--workdir" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu_slurm.sh"])
def test_shell_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# Stand-ins for the cluster tools: each runs what the real one would start, locally.
FAKE_GCLOUD = """#!/usr/bin/env bash
while (($#)); do [[ $1 == --command ]] && exec bash -c "$2"; shift; done
exit 9
"""
FAKE_SRUN = """#!/usr/bin/env bash
while [[ $1 == --* ]]; do shift; done
SLURM_PROCID=1 exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] && printf 'gpu-a01\\ngpu-a02\\n'
"""
# Records what launch/train.py would have been started with.
FAKE_PYTHON = """#!{python}
import json, os, sys
keys = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
        "JAX_LOCAL_DEVICE_IDS", "JAX_COMPILATION_CACHE_DIR")
with open(os.environ["CAPTURE"], "w") as f:
    json.dump(dict(argv=sys.argv[1:], cwd=os.getcwd(),
                   env={{k: os.environ.get(k) for k in keys}}), f)
"""
TRICKY = "--config.init.previous=('/runs/stage 1',)"


@pytest.fixture
def fake_cluster(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("gcloud", FAKE_GCLOUD), ("srun", FAKE_SRUN),
                       ("scontrol", FAKE_SCONTROL),
                       ("python", FAKE_PYTHON.format(python=sys.executable))]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHON=str(bin_dir / "python"),
               CAPTURE=str(tmp_path / "capture.json"), WORKDIR="/shared/runs/s 1")
    return env, tmp_path / "capture.json"


def test_tpu_pod_script_delivers_the_command(fake_cluster, tmp_path):
    env, capture = fake_cluster
    env.update(TPU_NAME="pod", ZONE="zone", REPO_DIR=str(REPO), STAGE="2a",
               JAX_COMPILATION_CACHE_DIR="gs://bucket/cache")
    proc = subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), TRICKY, "--config.x=1"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(capture.read_text())
    assert got["cwd"] == str(REPO)
    assert got["argv"] == ["launch/train.py", "--config", "configs/freezeempath_7b.py",
                           "--config.stage=2a", "--workdir", "/shared/runs/s 1", TRICKY,
                           "--config.x=1"]
    assert got["env"]["JAX_COMPILATION_CACHE_DIR"] == "gs://bucket/cache"
    assert got["env"]["JAX_COORDINATOR_ADDRESS"] is None  # TPU metadata names the hosts


def test_gpu_slurm_script_sets_what_the_trainer_reads(fake_cluster, monkeypatch):
    env, capture = fake_cluster
    env.update(SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_JOB_ID="123456", SLURM_NTASKS="2",
               SLURM_NNODES="2", SLURM_GPUS_ON_NODE="4", SLURM_SUBMIT_DIR=str(REPO))
    proc = subprocess.run(["bash", str(LAUNCH / "gpu_slurm.sh"), TRICKY],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(capture.read_text())
    assert got["argv"] == ["launch/train.py", "--config", "configs/freezeempath_7b.py",
                           "--config.stage=1", "--workdir", "/shared/runs/s 1", TRICKY]
    assert got["env"] == {"JAX_COORDINATOR_ADDRESS": "gpu-a01:23456",
                          "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
                          "JAX_LOCAL_DEVICE_IDS": "0,1,2,3", "JAX_COMPILATION_CACHE_DIR": None}

    # The trainer turns exactly that environment into jax.distributed.initialize arguments.
    import jax
    from freezeempath_jax.train import step
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False, raising=False)
    monkeypatch.delenv("FREEZEEMPATH_NO_DISTRIBUTED", raising=False)
    for key, value in got["env"].items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    assert step.maybe_initialize_distributed()
    assert calls == [dict(coordinator_address="gpu-a01:23456", num_processes=2, process_id=1)]
