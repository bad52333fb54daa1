"""Chat on a mesh of 8 fake CPU devices answers exactly as on one device (tiny random model).

The body runs in a subprocess: `--xla_force_host_platform_device_count` must be set before jax
starts, and pytest imported jax long before this module (the pattern of
test_train_sharding.py). The subprocess builds one ChatModel on a single device and one per
mesh (data, fsdp, tensor) = (1, 8, 1) (FSDP over all 8, as configs/freezeempath_7b.py), with the training rules: parameters
sharded by their logical names, activations constrained as in training. Each answers the
same two clips twice (greedy, then sampled with a seed), with speech units, then a second
turn of the same conversations (history spliced from the first). Text ids, units and emotion
labels must be equal; SER probabilities agree to 1e-5 (float32 reductions reordered by the
sharding).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json
    import jax, numpy as np
    from flax import linen as nn
    from freezeempath_jax import inference as chat
    from freezeempath_jax.checkpoints.model_tree import abstract_boxed_params, host_random_params
    from freezeempath_jax.models.presets import TINY
    from freezeempath_jax.sharding import make_mesh
    from freezeempath_jax.text import ByteTokenizer

    assert jax.device_count() == 8, jax.devices()
    params = host_random_params(nn.meta.unbox(abstract_boxed_params(TINY)), seed=3, std=0.1)
    tok = ByteTokenizer(TINY.llm.vocab_size, TINY.speech_token_id, TINY.emotion_token_id)
    rng = np.random.RandomState(0)
    clips = [0.1 * rng.randn(16000 * 3).astype(np.float32) for _ in range(2)]

    def run(shape):
        mesh = None if shape is None else make_mesh(shape)
        m = chat.ChatModel(TINY, params, tok, chat_template="plain", audio_seconds=3.0,
                           max_units=8, mesh=mesh)
        if mesh is not None:  # really sharded: some parameter is split over devices
            leaves = jax.tree.leaves(m.params)
            assert any(x.sharding.shard_shape(x.shape) != x.shape for x in leaves)
        out = []
        convs = [chat.Conversation(), chat.Conversation()]
        for kw in (dict(temperature=0.0), dict(temperature=1.0, top_k=20, seed=5)):
            for r in m.respond(clips, max_new_tokens=6, speech=True, pad_batch_to=2, **kw):
                out.append(dict(ids=r.text_ids, units=r.units, emotion=r.emotion,
                                probs=r.probabilities))
        m.respond(clips, convs, max_new_tokens=4, temperature=0.0)
        for r in m.respond(clips, convs, max_new_tokens=4, temperature=0.0):
            out.append(dict(ids=r.text_ids, units=r.units, emotion=r.emotion,
                            probs=r.probabilities))
        return out

    print("RESULT " + json.dumps({str(s): run(s) for s in (None, (1, 8, 1))}))
""")


def test_chat_on_8_device_mesh_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    runs = json.loads(line[len("RESULT "):])
    ref = runs.pop("None")
    assert len(ref) == 6 and all(r["ids"] for r in ref[:4]), ref
    assert all(r["units"] is not None for r in ref[:4])
    for mesh, got in runs.items():
        assert len(got) == len(ref)
        for i, (a, b) in enumerate(zip(ref, got)):
            assert a["ids"] == b["ids"], (mesh, i, a["ids"], b["ids"])
            assert a["units"] == b["units"], (mesh, i)
            assert a["emotion"] == b["emotion"], (mesh, i)
            for k in a["probs"]:
                assert abs(a["probs"][k] - b["probs"][k]) < 1e-5, (mesh, i, k)


def test_load_chat_model_with_a_mesh_string_initialises_into_shardings():
    """`load_chat_model(config, mesh="1x-1x1")` (the `chat --mesh` path): parameters no
    checkpoint holds are initialised straight into their shardings on the mesh (one device
    here); a malformed mesh is one error naming it."""
    import jax
    import pytest

    from freezeempath_jax.inference.loading import load_chat_model
    from freezeempath_jax.models.presets import TINY

    m = load_chat_model(TINY, mesh="1x-1x1")
    assert dict(m.mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}
    leaves = jax.tree.leaves(m.params)
    assert leaves and all(isinstance(x.sharding, jax.sharding.NamedSharding) for x in leaves)
    with pytest.raises(ValueError, match="2xq"):
        load_chat_model(TINY, mesh="2xq")
