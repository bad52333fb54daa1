"""One sharded train step on 8 fake CPU devices equals the single-device step.

The body runs in a subprocess: `--xla_force_host_platform_device_count` must be set before jax
initialises its backend, and pytest has imported jax long before this module. The subprocess
runs stage 2a (Whisper -> emotion extractor + projector -> frozen LLM, CE + SER loss) on the
tiny model in float32 on meshes (data, fsdp, tensor) = (8,1,1), (2,4,1), (2,2,2) and compares
loss, gradient norm and updated trainable parameters with a (1,1,1) mesh; then gradient
accumulation over 2 microbatches against the single big batch.

Tolerances (float32, reductions reordered by sharding): loss and gradient norm 1e-5 relative;
parameters: the difference from the reference update, relative to the update's own size,
below 1e-3 (Adam's first step is lr * g / (|g| + eps); eps = 1e-4 keeps it smooth in g, so
reduction-order noise in g stays noise in the update).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import jax, jax.numpy as jnp, numpy as np
    from flax import linen as nn
    from freezeempath_jax import params as P_
    from freezeempath_jax.models.presets import TINY
    from freezeempath_jax.sharding import make_mesh
    from freezeempath_jax.checkpoints.model_tree import abstract_boxed_params, host_random_params
    from freezeempath_jax.train.step import example_batch, make_train_step

    assert jax.device_count() == 8, jax.devices()
    full = host_random_params(nn.meta.unbox(abstract_boxed_params(TINY)), seed=4)
    batch = example_batch(TINY, "emotion_ce", 8, mel_frames=60, seed=5)
    cfg = dict(stage="2a", steps=10, learning_rate=1e-3, eps=1e-4, frozen_dtype="float32",
               weight_decay=0.01)

    def run(shape, microbatches=1):
        t = time.time()
        devices = jax.devices()[: int(np.prod(shape))]
        ts = make_train_step(TINY, dict(cfg, microbatches=microbatches),
                             make_mesh(shape, devices=devices))
        state, frozen = ts.from_params(full)
        p0 = {p: np.asarray(v) for p, v in P_.flatten_with_paths(state.params).items()}
        state, m = ts.step(state, frozen, batch)
        p1 = {p: np.asarray(v) for p, v in P_.flatten_with_paths(state.params).items()}
        specs = sorted({str(s.spec) for s in jax.tree.leaves(ts.param_shardings)})
        shard_shapes = {p: list(v.sharding.shard_shape(v.shape))
                        for p, v in P_.flatten_with_paths(state.params).items()}
        return dict(loss=float(m["loss"]), grad_norm=float(m["grad_norm"]),
                    ser_accuracy=float(m["ser_accuracy"]), p0=p0, p1=p1, specs=specs,
                    shard_shapes=shard_shapes, seconds=time.time() - t)

    ref = run((1, 1, 1))
    out = {}
    for shape, mb in [((8, 1, 1), 1), ((2, 4, 1), 1), ((2, 2, 2), 1), ((1, 1, 1), 2)]:
        r = run(shape, mb)
        upd = max(np.abs(ref["p1"][p] - ref["p0"][p]).max() for p in ref["p1"])
        diff = max(np.abs(r["p1"][p] - ref["p1"][p]).max() for p in ref["p1"])
        start = max(np.abs(r["p0"][p] - ref["p0"][p]).max() for p in ref["p0"])
        name = "x".join(map(str, shape)) + (f"/micro{mb}" if mb > 1 else "")
        out[name] = dict(loss=r["loss"], ref_loss=ref["loss"], grad_norm=r["grad_norm"],
                         ref_grad_norm=ref["grad_norm"], update=float(upd),
                         param_diff=float(diff), start_diff=float(start),
                         specs=r["specs"], seconds=r["seconds"],
                         sharded=sum(s != list(ref["p1"][p].shape)
                                     for p, s in r["shard_shapes"].items()))
    out["reference_seconds"] = ref["seconds"]
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("mesh", ["8x1x1", "2x4x1", "2x2x2", "1x1x1/micro2"])
def test_sharded_step_matches_single_device(results, mesh):
    r = results[mesh]
    assert r["start_diff"] == 0.0
    assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), r
    assert abs(r["grad_norm"] - r["ref_grad_norm"]) <= 1e-5 * r["ref_grad_norm"], r
    assert r["update"] > 0
    assert r["param_diff"] <= 1e-3 * r["update"], r


def test_meshes_really_shard(results):
    # fsdp / tensor meshes must actually split trainable parameters across devices.
    assert results["2x4x1"]["sharded"] > 0
    assert results["2x2x2"]["sharded"] > 0
    assert any("tensor" in s for s in results["2x2x2"]["specs"])
    assert results["8x1x1"]["sharded"] == 0  # data parallel only: parameters replicated
