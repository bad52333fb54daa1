"""Broken checkpoints: every failure mode raises one `CheckpointError` that says what is wrong
(the key or keys, expected vs actual shape or size, and the file), never a KeyError, a numpy
reshape error or a crash deep inside a parser.

The checkpoints are tiny real files: transformers `save_pretrained` of random Qwen2 / Whisper
models, a GGUF written with the `gguf` package and a CTranslate2 `model.bin` written by our
exporter, then damaged on disk (files removed, cut short, tensors dropped, added or resized).
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import linen as nn
from safetensors.numpy import load_file, save_file

from freezeempath_jax.checkpoints import (CheckpointError, load_causal_lm, load_converted,
                                          load_freezeempath, load_whisper_encoder)
from freezeempath_jax.checkpoints.model_tree import whisper_init
from freezeempath_jax.checkpoints.whisper import save_whisper_encoder_ct2
from freezeempath_jax.models.configs import WhisperConfig
from test_checkpoints_causal_lm import tiny_lm, write_gguf

INDEX = "model.safetensors.index.json"


def one_error(fn, *args, **kw) -> CheckpointError:
    """Runs a loader that must fail and returns its CheckpointError (any other exception,
    or none, fails the test)."""
    with pytest.raises(CheckpointError) as err:
        fn(*args, **kw)
    e = err.value
    assert e.problems, "a CheckpointError must list at least one problem"
    return e


def kinds(e: CheckpointError):
    return {p.kind for p in e.problems}


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    """A tiny Qwen2 written by transformers twice: one file, and sharded with an index."""
    root = tmp_path_factory.mktemp("lm")
    model = tiny_lm("qwen2", tie=False)
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="60KB")
    assert (root / "sharded" / INDEX).exists() and (root / "single" / "model.safetensors").exists()
    write_gguf(root / "m.gguf", model, "qwen2")
    return root


@pytest.fixture(scope="module")
def whisper_dirs(tmp_path_factory):
    """A tiny Hugging Face Whisper directory and a CTranslate2 encoder exported from random
    params of our own encoder."""
    from transformers import WhisperConfig as HFWhisperConfig, WhisperForConditionalGeneration

    root = tmp_path_factory.mktemp("whisper")
    hf = HFWhisperConfig(vocab_size=51864, num_mel_bins=80, d_model=64, encoder_layers=2,
                         encoder_attention_heads=4, decoder_layers=1, decoder_attention_heads=4,
                         encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=50,
                         max_target_positions=32)
    WhisperForConditionalGeneration(hf).save_pretrained(root / "hf")
    cfg = WhisperConfig(n_mels=80, d_model=64, num_layers=2, num_heads=4, mlp_dim=128,
                        max_source_positions=50)
    shapes = nn.meta.unbox(jax.eval_shape(whisper_init(cfg))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
    save_whisper_encoder_ct2(str(root / "ct2"), cfg, params, dtype=np.float16)
    return root


def copy_of(src, dst):
    shutil.copytree(src, dst)
    return dst


def truncate(path, keep_bytes):
    with open(path, "r+b") as f:
        f.truncate(keep_bytes)


def rewrite(path, edit):
    """Loads a safetensors file, applies `edit(dict)`, writes it back (header rebuilt)."""
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


# ------------------------------------------------------------------------- missing files


@pytest.mark.parametrize("loader", [load_causal_lm, load_whisper_encoder, load_freezeempath,
                                    load_converted])
def test_missing_directory(tmp_path, loader):
    gone = tmp_path / "not_there"
    e = one_error(loader, str(gone))
    assert len(e.problems) == 1 and kinds(e) == {"file"}
    assert str(gone) in str(e)


@pytest.mark.parametrize("name", ["model.gguf", "encoder.pt"])
def test_missing_file(tmp_path, name):
    gone = tmp_path / name
    loader = load_causal_lm if name.endswith(".gguf") else load_whisper_encoder
    e = one_error(loader, str(gone))
    assert len(e.problems) == 1 and kinds(e) == {"file"} and name in str(e)


def test_missing_shard_names_its_keys(tmp_path, lm_dirs):
    d = copy_of(lm_dirs / "sharded", tmp_path / "ckpt")
    weight_map = json.loads((d / INDEX).read_text())["weight_map"]
    shard = sorted(set(weight_map.values()))[1]
    listed = sorted(k for k, s in weight_map.items() if s == shard)
    os.remove(d / shard)
    e = one_error(load_causal_lm, str(d))
    assert len(e.problems) == 1 and kinds(e) == {"file"}
    msg = str(e)
    assert shard in msg and "file not found" in msg and INDEX in msg
    assert all(k in msg for k in listed), (listed, msg)


def test_key_listed_in_index_but_absent_from_shard(tmp_path, lm_dirs):
    d = copy_of(lm_dirs / "sharded", tmp_path / "ckpt")
    weight_map = json.loads((d / INDEX).read_text())["weight_map"]
    key = "model.layers.1.mlp.down_proj.weight"
    rewrite(d / weight_map[key], lambda t: t.pop(key))
    e = one_error(load_causal_lm, str(d))
    assert e.keys() == [key] and kinds(e) == {"missing"}
    assert weight_map[key] in str(e) and INDEX in str(e)


# ------------------------------------------------------------------------------ truncation


def test_truncated_safetensors_names_cut_tensors(tmp_path, lm_dirs):
    d = copy_of(lm_dirs / "single", tmp_path / "ckpt")
    path = d / "model.safetensors"
    header = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8],
                                                               "little")])
    header.pop("__metadata__", None)
    last = max(header, key=lambda k: header[k]["data_offsets"][1])  # stored last on disk
    size = path.stat().st_size
    truncate(path, size - 1000)  # an interrupted download
    e = one_error(load_causal_lm, str(d))
    assert kinds(e) == {"truncated"}
    assert last in e.keys("truncated")
    msg = str(e)
    assert f"{size} bytes" in msg and f"{size - 1000} bytes" in msg  # expected vs actual size
    assert str(path) in msg and str(tuple(header[last]["shape"])) in msg


def test_safetensors_cut_inside_header(tmp_path, lm_dirs):
    d = copy_of(lm_dirs / "single", tmp_path / "ckpt")
    truncate(d / "model.safetensors", 100)
    e = one_error(load_causal_lm, str(d))
    assert len(e.problems) == 1 and kinds(e) == {"truncated"}
    assert "model.safetensors" in str(e) and "100 bytes" in str(e)


def test_truncated_shard_of_sharded_checkpoint(tmp_path, lm_dirs):
    d = copy_of(lm_dirs / "sharded", tmp_path / "ckpt")
    weight_map = json.loads((d / INDEX).read_text())["weight_map"]
    shard = sorted(set(weight_map.values()))[-1]
    truncate(d / shard, (d / shard).stat().st_size // 2)
    e = one_error(load_causal_lm, str(d))
    assert kinds(e) == {"truncated"} and shard in str(e)
    assert set(e.keys()) <= {k for k, s in weight_map.items() if s == shard}


def test_truncated_gguf_data(tmp_path, lm_dirs):
    path = tmp_path / "m.gguf"
    shutil.copy(lm_dirs / "m.gguf", path)
    size = path.stat().st_size
    truncate(path, size - 5000)
    e = one_error(load_causal_lm, str(path))
    assert kinds(e) == {"truncated"}  # not wrapped as "corrupt" by the header parser
    assert "output.weight" in e.keys()  # the last tensor in the file
    msg = str(e)
    assert f"{size} bytes" in msg and f"{size - 5000} bytes" in msg and str(path) in msg
    assert "(96, 64)" in msg  # the cut tensor's shape: lm head [vocab, hidden]


def test_truncated_gguf_header(tmp_path, lm_dirs):
    path = tmp_path / "m.gguf"
    shutil.copy(lm_dirs / "m.gguf", path)
    truncate(path, 300)
    e = one_error(load_causal_lm, str(path))
    assert len(e.problems) == 1 and kinds(e) == {"truncated"}
    assert "GGUF header" in str(e) and "300 bytes" in str(e) and str(path) in str(e)


def test_truncated_ctranslate2_data(tmp_path, whisper_dirs):
    from freezeempath_jax.checkpoints.ctranslate2_io import list_variables

    d = copy_of(whisper_dirs / "ct2", tmp_path / "ct2")
    path = d / "model.bin"
    size = path.stat().st_size
    truncate(path, size // 2)
    e = one_error(load_whisper_encoder, str(d))
    assert len(e.problems) == 1 and kinds(e) == {"truncated"}
    (key,) = e.keys()
    names = {n: shape for n, shape, _ in list_variables(str(whisper_dirs / "ct2"))}
    assert key in names
    msg = str(e)
    assert str(path) in msg and f"{size // 2} bytes" in msg and str(tuple(names[key])) in msg


def test_truncated_ctranslate2_entry(tmp_path, whisper_dirs):
    # cut inside the first variable's name: the header itself is incomplete
    d = copy_of(whisper_dirs / "ct2", tmp_path / "ct2")
    truncate(d / "model.bin", 30)
    e = one_error(load_whisper_encoder, str(d))
    assert len(e.problems) == 1 and kinds(e) == {"truncated"}
    assert "variable 1" in str(e) and "30 bytes" in str(e) and "model.bin" in str(e)


# --------------------------------------------------------------------------- architecture


def _set_model_type(d, model_type):
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = model_type
    (d / "config.json").write_text(json.dumps(cfg))


def test_unknown_architecture_causal_lm(tmp_path, lm_dirs):
    d = copy_of(lm_dirs / "single", tmp_path / "ckpt")
    _set_model_type(d, "gpt2")
    e = one_error(load_causal_lm, str(d))
    assert len(e.problems) == 1 and kinds(e) == {"architecture"} and e.keys() == ["model_type"]
    msg = str(e)
    assert "gpt2" in msg and "qwen2 or llama" in msg and str(d / "config.json") in msg


def test_unknown_architecture_whisper(tmp_path, whisper_dirs):
    d = copy_of(whisper_dirs / "hf", tmp_path / "ckpt")
    _set_model_type(d, "gpt2")
    e = one_error(load_whisper_encoder, str(d))
    assert len(e.problems) == 1 and e.keys() == ["model_type"]
    assert "gpt2" in str(e) and "whisper" in str(e) and "config.json" in str(e)


def test_unknown_architecture_release(tmp_path):
    from release_fixture import build_release

    rel = build_release(str(tmp_path))
    _set_model_type(tmp_path / "release", "gpt2")
    e = one_error(load_freezeempath, rel.path)
    assert len(e.problems) == 1 and e.keys() == ["model_type"]
    assert "gpt2" in str(e) and "omni2_speech2s_qwen2" in str(e) and "config.json" in str(e)


def test_plain_llm_is_not_a_release(lm_dirs):
    # a Qwen2 directory given as the release by mistake is named as such (not reported as a
    # release lacking its Whisper encoder)
    e = one_error(load_freezeempath, str(lm_dirs / "single"))
    assert len(e.problems) == 1 and e.keys() == ["model_type"]
    assert "qwen2" in str(e) and "omni2_speech2s_qwen2" in str(e)


# ------------------------------------------------------------------------------ key table


def test_missing_key(tmp_path, lm_dirs):
    d = copy_of(lm_dirs / "single", tmp_path / "ckpt")
    key = "model.layers.1.mlp.up_proj.weight"
    rewrite(d / "model.safetensors", lambda t: t.pop(key))
    e = one_error(load_causal_lm, str(d))
    assert e.keys() == [key] and kinds(e) == {"missing"}
    msg = str(e)
    assert "(112, 64)" in msg and str(d) in msg  # the shape it should have had: [mlp, hidden]
    assert "layers/mlp/up_proj/kernel" in msg  # what it was needed for


def test_unexpected_key(tmp_path, lm_dirs):
    d = copy_of(lm_dirs / "single", tmp_path / "ckpt")
    key = "model.layers.0.self_attn.extra_gate.weight"
    rewrite(d / "model.safetensors",
            lambda t: t.__setitem__(key, np.zeros((3, 4), np.float32)))
    e = one_error(load_causal_lm, str(d))
    assert e.keys() == [key] and kinds(e) == {"unexpected"}
    assert "(3, 4)" in str(e) and str(d / "model.safetensors") in str(e)


def test_misshaped_key(tmp_path, lm_dirs):
    d = copy_of(lm_dirs / "sharded", tmp_path / "ckpt")
    weight_map = json.loads((d / INDEX).read_text())["weight_map"]
    key = "model.layers.2.self_attn.k_proj.weight"  # [kv_heads * head_dim, hidden] = [32, 64]
    shard = weight_map[key]
    rewrite(d / shard, lambda t: t.__setitem__(key, np.ascontiguousarray(t[key][:16])))
    e = one_error(load_causal_lm, str(d))
    assert e.keys() == [key] and kinds(e) == {"shape"}
    msg = str(e)
    assert key in msg and "(32, 64)" in msg and "(16, 64)" in msg and shard in msg
    assert msg.index("(32, 64)") < msg.index("(16, 64)")  # "expected ..., got ..."


def test_many_problems_in_one_error(tmp_path, lm_dirs):
    """Everything wrong is reported at once, so a user fixes a checkpoint in one go."""
    d = copy_of(lm_dirs / "single", tmp_path / "ckpt")

    def edit(t):
        t.pop("model.norm.weight")
        t["stray.bias"] = np.zeros(5, np.float32)
        t["model.layers.0.mlp.gate_proj.weight"] = np.zeros((100, 64), np.float32)

    rewrite(d / "model.safetensors", edit)
    e = one_error(load_causal_lm, str(d))
    assert sorted((p.kind, p.key) for p in e.problems) == [
        ("missing", "model.norm.weight"), ("shape", "model.layers.0.mlp.gate_proj.weight"),
        ("unexpected", "stray.bias")]
    assert "3 problem(s)" in str(e)


def test_misshaped_whisper_key(tmp_path, whisper_dirs):
    d = copy_of(whisper_dirs / "hf", tmp_path / "ckpt")
    key = "model.encoder.layers.1.fc1.weight"  # [ffn, d] = [128, 64]
    rewrite(d / "model.safetensors",
            lambda t: t.__setitem__(key, np.zeros((96, 64), np.float32)))
    e = one_error(load_whisper_encoder, str(d))
    assert e.keys() == [key] and kinds(e) == {"shape"}
    assert "(128, 64)" in str(e) and "(96, 64)" in str(e) and "model.safetensors" in str(e)
