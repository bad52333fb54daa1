"""The FreezeEmpath release layout (tests/release_fixture.py: tiny dims, the real key names,
sharded with an index) loads into our tree, and the composite forward matches the PyTorch
reference written from DESIGN.md: speech / emotion embeddings spliced into the Qwen2 LLM.

Variants: linear and ffn input projections of the speech generator, gate fusion on and off,
Whisper inside (`model.speech_encoder.*`, OpenAI names) and outside (`whisper=` an OpenAI
.pt). Float32 throughout; measured max abs errors ~1e-6 (logits), tolerances 1e-4 relative.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from freezeempath_jax.checkpoints import CheckpointError, load_freezeempath, parse_stream_params
from freezeempath_jax.models.causal_lm import CausalLM
from freezeempath_jax.models.freezeempath import FreezeEmpath
from release_fixture import build_release, reference_forward

RTOL = 1e-4


@functools.lru_cache(maxsize=None)
def _forward(cfg):
    return jax.jit(lambda p, mel, ids: FreezeEmpath(cfg).apply({"params": p}, mel, ids))


def prompt(cfg, rng, batch=2):
    s = cfg.num_speech_tokens
    rows = [np.concatenate([rng.integers(5, 200, 6), [cfg.speech_token_id] * s,
                            rng.integers(5, 200, 4), [cfg.emotion_token_id],
                            rng.integers(5, 200, 3)]) for _ in range(batch)]
    return np.asarray(rows, np.int32)


def assert_close(name, ours, ref):
    ours = np.asarray(ours)
    err = np.abs(ours - ref).max()
    assert ours.shape == ref.shape, name
    assert err <= RTOL * max(1.0, np.abs(ref).max()), f"{name}: max abs error {err}"


def check_composite(rel, cfg, params):
    rng = np.random.default_rng(0)
    mel = rng.standard_normal((2, 80, 3000)).astype(np.float32)
    ids = prompt(cfg, rng)
    ref = reference_forward(rel, mel, ids, cfg.speech_token_id, cfg.emotion_token_id)
    out = _forward(cfg)(params, mel, ids)
    for name in ("logits", "hidden_states", "emotion_embedding", "ser_logits"):
        assert_close(name, getattr(out, name), ref[name])


@torch.no_grad()
def check_speech_decoder(rel, cfg, params):
    """Speech-generator LM logits and the fused text-side inputs vs torch."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, cfg.speech_decoder.lm.vocab_size, (2, 9)).astype(np.int32)
    ref = rel.speech_generator.model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    ours = CausalLM(cfg.speech_decoder.lm).apply({"params": params["speech_decoder"]["lm"]},
                                                 input_ids=ids).logits
    assert_close("speech decoder logits", ours, ref)
    h = rng.standard_normal((2, 9, cfg.llm.hidden_size)).astype(np.float32)
    ref = rel.speech_generator.fuse(torch.as_tensor(h), torch.as_tensor(ids,
                                                                         dtype=torch.long))
    ours = FreezeEmpath(cfg).apply({"params": params}, h, ids,
                                   method=lambda m, h, i: m.speech_decoder.fuse(h, i))
    assert_close("speech decoder fused inputs", ours, ref.numpy())


@pytest.mark.parametrize("proj_type,gate", [("linear", False), ("ffn", True)])
def test_release_loads_and_matches_torch(tmp_path, proj_type, gate):
    rel = build_release(str(tmp_path), proj_type=proj_type, gate_fusion=gate)
    cfg, params = load_freezeempath(rel.path, frozen_dtype=jnp.float32)
    sd = cfg.speech_decoder
    assert (sd.proj_type, sd.gate_fusion, sd.stream_n, sd.stream_m) == (proj_type, gate, 3, 15)
    assert (sd.unit_vocab_size, sd.unit_offset, sd.sep_token_id) == (32, 257, 256)
    assert (cfg.whisper.d_model, cfg.whisper.num_heads, cfg.projector.k) == (128, 2, 5)
    assert set(params) == {"whisper", "projector", "emotion", "llm", "speech_decoder"}
    check_composite(rel, cfg, params)
    check_speech_decoder(rel, cfg, params)


def test_release_whisper_outside_and_dtypes(tmp_path):
    rel = build_release(str(tmp_path), whisper_inside=False)
    with pytest.raises(CheckpointError, match="pass whisper=PATH"):
        load_freezeempath(rel.path)
    cfg, params = load_freezeempath(rel.path, whisper=rel.whisper_path,
                                    frozen_dtype=jnp.float32)
    check_composite(rel, cfg, params)
    # default: frozen parts bf16, trainable parts float32
    cfg16, p16 = load_freezeempath(rel.path, whisper=rel.whisper_path)
    assert cfg16.llm.param_dtype == cfg16.whisper.param_dtype == "bfloat16"
    dts = {k: {x.dtype.name for x in jax.tree.leaves(v)} for k, v in p16.items()}
    assert dts == {"whisper": {"bfloat16"}, "llm": {"bfloat16"}, "projector": {"float32"},
                   "emotion": {"float32"}, "speech_decoder": {"float32"}}


def test_stream_params_parsing():
    for text in ("(3,15)", " ( 3 , 15 ) ", "3,15", "[3, 15]", [3, 15], (3, 15)):
        assert parse_stream_params(text) == (3, 15)
    for bad in ("(3,15,2)", "__import__('os')", "3;15", "(a,b)", 3, None):
        with pytest.raises(CheckpointError, match="stream_params"):
            parse_stream_params(bad)
