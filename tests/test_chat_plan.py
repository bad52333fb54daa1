"""A 7B-shaped chat turn (Whisper-large-v3 + Qwen2.5-7B, bf16) compiles for meshes of 4 and 8
fake CPU devices (FSDP, as configs/freezeempath_7b.py) with under 16 GB of parameters and
arguments per device: the model that does not fit one 16 GB chip fits 4 of them.

Compile only, from abstract arrays (`inference.plan`), in a subprocess: the fake device count
must be in XLA_FLAGS before jax starts (the pattern of test_train_sharding.py).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GB = 1e9

SCRIPT = textwrap.dedent("""
    import dataclasses, json
    from freezeempath_jax.inference import plan
    from freezeempath_jax.models import presets
    out = {}
    for shape in ((1, 4, 1), (1, 8, 1)):
        p = plan.plan_turn(presets.FREEZEEMPATH_7B, shape, max_new_tokens=8)
        out[p.devices] = dict(dataclasses.asdict(p), total=p.total)
    print("RESULT " + json.dumps(out))
""")


def test_7b_chat_turn_fits_16gb_devices_on_4_and_8_device_meshes():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    plans = json.loads(line[len("RESULT "):])
    four, eight = plans["4"], plans["8"]
    # the whole model in bf16 does not fit one 16 GB device ...
    assert four["params_total"] > 16 * GB, four["params_total"]
    for p in (four, eight):
        # ... its shards do, and so does what the compiled turn reads
        assert 0 < p["argument"] < 16 * GB, p
        assert p["params_held"] < 16 * GB, p
    # the parameters are really split: 8 devices hold about half of what 4 hold
    assert eight["params_held"] < 0.6 * four["params_held"], (four, eight)
    assert four["params_held"] < 0.3 * four["params_total"], four
