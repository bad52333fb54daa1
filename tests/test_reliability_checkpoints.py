"""Issue 17: malformed (not truncated) checkpoints are one `CheckpointError` naming the file
and the field, raised fast, never a KeyError / TypeError / ZeroDivisionError, a silent load
of NaN weights or of the wrong bytes, a MemoryError after minutes, or a file read from
outside the checkpoint folder.

The checkpoints are tiny random ones written here straight from our own key tables (no
transformers models to build), in the Hugging Face safetensors, GGUF and OpenAI `.pt` layouts.
"""

import json
import os
import time

import numpy as np
import pytest

from freezeempath_jax.checkpoints import CheckpointError, load_causal_lm, load_whisper_encoder
from freezeempath_jax.checkpoints.causal_lm import config_from_hf, gguf_rules, hf_rules
from freezeempath_jax.checkpoints.safetensors_io import save_safetensors_sharded
from freezeempath_jax.checkpoints.whisper import openai_rules
from freezeempath_jax.models.configs import WhisperConfig

INDEX = "model.safetensors.index.json"
LM_CONFIG = dict(model_type="qwen2", vocab_size=32, hidden_size=16, intermediate_size=24,
                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 max_position_embeddings=128, tie_word_embeddings=False)


def one_error(fn, *args) -> CheckpointError:
    """The CheckpointError of a load that must fail (any other exception fails the test)."""
    with pytest.raises(CheckpointError) as err:
        fn(*args)
    assert len(err.value.problems) >= 1
    return err.value


def lm_tensors(rules) -> dict:
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(r.shape).astype(np.float32) for r in rules for k in r.keys()}


def write_hf_lm(d, config=None, max_shard_bytes=None):
    """A Qwen2 directory: config.json and safetensors (sharded with an index if asked)."""
    config = dict(LM_CONFIG, **(config or {}))
    tensors = lm_tensors(hf_rules(config_from_hf(LM_CONFIG, np.float32)))
    save_safetensors_sharded(tensors, str(d), max_shard_bytes=max_shard_bytes)
    (d / "config.json").write_text(json.dumps(config))
    return d


def edit_header(path, edit):
    """Applies `edit(header dict)` to a safetensors file's JSON header, keeping its data."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def message(d, *lines) -> str:
    return f"cannot load checkpoint {d}: {len(lines)} problem(s)\n  - " + "\n  - ".join(lines)


def test_the_fixtures_load(tmp_path):
    cfg, _ = load_causal_lm(write_hf_lm(tmp_path / "lm"))
    assert cfg.num_layers == 2 and cfg.hidden_size == 16
    load_causal_lm(write_hf_lm(tmp_path / "sharded", max_shard_bytes=2000))
    assert (tmp_path / "sharded" / INDEX).exists()


# ------------------------------------------------------------------------ safetensors


def test_header_that_is_a_list(tmp_path):
    d = write_hf_lm(tmp_path / "lm")
    path = d / "model.safetensors"
    path.write_bytes((2).to_bytes(8, "little") + b"[]")
    e = one_error(load_causal_lm, str(d))
    assert str(e) == message(d, f"corrupt: expected a JSON object, got a JSON list, in {path} "
                                "(safetensors header)")


def test_entry_without_data_offsets(tmp_path):
    d = write_hf_lm(tmp_path / "lm")
    path = d / "model.safetensors"
    key = "model.norm.weight"
    edit_header(path, lambda h: h[key].pop("data_offsets"))
    e = one_error(load_causal_lm, str(d))
    assert str(e) == message(d, f"corrupt: key '{key}', in {path} "
                                "(header entry lacks field 'data_offsets')")


def test_negative_data_offsets(tmp_path):
    d = write_hf_lm(tmp_path / "lm")
    path = d / "model.safetensors"
    key = "model.norm.weight"
    edit_header(path, lambda h: h[key].update(data_offsets=[-64, 0]))
    e = one_error(load_causal_lm, str(d))
    assert str(e) == message(d, f"corrupt: key '{key}', expected [begin, end] with 0 <= begin "
                                f"<= end, got [-64, 0], in {path} (field 'data_offsets')")


def test_overlapping_data_offsets(tmp_path):
    # Two same-sized tensors pointing at the same bytes used to load one tensor twice.
    d = write_hf_lm(tmp_path / "lm")
    path = d / "model.safetensors"
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight"
    offsets = {}

    def edit(h):
        offsets["a"] = h[a]["data_offsets"]
        h[b]["data_offsets"] = list(offsets["a"])

    edit_header(path, edit)
    e = one_error(load_causal_lm, str(d))
    first, second = sorted([a, b])
    assert str(e) == message(d, f"corrupt: key '{second}', in {path} (field 'data_offsets' "
                                f"{offsets['a']} overlaps {offsets['a']} of '{first}')")


def test_nan_weight_is_named(tmp_path):
    d = write_hf_lm(tmp_path / "lm")
    path = d / "model.safetensors"
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path))
    key = "model.layers.1.mlp.up_proj.weight"
    tensors[key][3, 5] = np.nan
    tensors[key][7, 1] = np.inf
    save_file(tensors, str(path))
    e = one_error(load_causal_lm, str(d))
    assert str(e) == message(path, f"corrupt: key '{key}', in {path} (2 NaN or infinite "
                                   "value(s) among 384 of shape (24, 16), first at index (3, 5))")


def test_shard_outside_the_folder_is_never_opened(tmp_path):
    d = write_hf_lm(tmp_path / "lm", max_shard_bytes=2000)
    index = d / INDEX
    data = json.loads(index.read_text())
    key = "model.norm.weight"
    outside = tmp_path / "outside.safetensors"
    os.replace(d / data["weight_map"][key], outside)  # a real file, so opening it would work
    data["weight_map"][key] = "../outside.safetensors"
    index.write_text(json.dumps(data))
    e = one_error(load_causal_lm, str(d))
    assert str(e) == message(index, f"corrupt: key 'weight_map', found '../outside.safetensors', "
                                    f"in {index} (the shard of '{key}' must be a file name "
                                    "inside the checkpoint folder)")
    data["weight_map"][key] = str(outside)  # absolute paths too
    index.write_text(json.dumps(data))
    assert "inside the checkpoint folder" in str(one_error(load_causal_lm, str(d)))


# ------------------------------------------------------------------------ config.json


def test_config_without_hidden_size(tmp_path):
    d = write_hf_lm(tmp_path / "lm")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    e = one_error(load_causal_lm, str(d))
    origin = d / "config.json"
    assert str(e) == message(origin, f"config: key 'hidden_size', in {origin} "
                                     "(required field is missing)")


def test_config_with_zero_attention_heads(tmp_path):
    d = write_hf_lm(tmp_path / "lm", {"num_attention_heads": 0})
    e = one_error(load_causal_lm, str(d))
    origin = d / "config.json"
    assert str(e) == message(origin, "config: key 'num_attention_heads', expected an integer "
                                     f"in 1..1024, got 0, in {origin}")


def test_absurd_layer_count_fails_fast(tmp_path):
    # Used to build a ten-million-layer key table for 80 s, then a MemoryError.
    d = write_hf_lm(tmp_path / "lm", {"num_hidden_layers": 10_000_000})
    start = time.perf_counter()
    e = one_error(load_causal_lm, str(d))
    assert time.perf_counter() - start < 2.0
    origin = d / "config.json"
    assert str(e) == message(origin, "config: key 'num_hidden_layers', expected an integer "
                                     f"in 1..1024, got 10000000, in {origin}")


def test_kv_heads_that_do_not_divide_heads(tmp_path):
    d = write_hf_lm(tmp_path / "lm", {"num_attention_heads": 4, "num_key_value_heads": 3})
    e = one_error(load_causal_lm, str(d))
    assert e.keys() == ["num_key_value_heads"] and str(d / "config.json") in str(e)


# ------------------------------------------------------------------------------- GGUF


def write_gguf(path, block_count=2, nan_key=None):
    import gguf

    cfg = config_from_hf(LM_CONFIG, np.float32)
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(block_count)
    w.add_context_length(128)
    w.add_embedding_length(16)
    w.add_feed_forward_length(24)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_custom_alignment(32)
    for name, a in lm_tensors(gguf_rules(cfg, "qwen2")).items():
        if name == nan_key:
            a[0, 0] = np.nan
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_fixture_loads(tmp_path):
    cfg, _ = load_causal_lm(str(write_gguf(tmp_path / "m.gguf")))
    assert cfg.num_layers == 2


def test_gguf_zero_alignment(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    raw = bytearray(path.read_bytes())
    key = b"general.alignment"
    at = raw.index(key) + len(key)
    assert raw[at:at + 8] == (4).to_bytes(4, "little") + (32).to_bytes(4, "little")  # uint32 32
    raw[at + 4:at + 8] = bytes(4)
    path.write_bytes(bytes(raw))
    e = one_error(load_causal_lm, str(path))
    assert str(e) == message(path, "corrupt: key 'general.alignment', expected a power of two, "
                                   f"got 0, in {path}")


def test_gguf_nan_tensor(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", nan_key="blk.1.ffn_down.weight")
    e = one_error(load_causal_lm, str(path))
    assert str(e) == message(path, f"corrupt: key 'blk.1.ffn_down.weight', in {path} (1 NaN or "
                                   "infinite value(s) among 384 of shape (16, 24), first at "
                                   "index (0, 0))")


def test_gguf_absurd_block_count_fails_fast(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", block_count=10_000_000)
    start = time.perf_counter()
    e = one_error(load_causal_lm, str(path))
    assert time.perf_counter() - start < 2.0
    assert str(e) == message(path, "config: key 'qwen2.block_count', expected an integer in "
                                   f"1..1024, got 10000000, in {path}")


# ---------------------------------------------------------------------- Whisper files

WHISPER = WhisperConfig(n_mels=8, d_model=16, num_layers=2, num_heads=2, mlp_dim=64,
                        max_source_positions=10)
DIMS = dict(n_mels=8, n_audio_ctx=10, n_audio_state=16, n_audio_head=2, n_audio_layer=2)


def write_openai_pt(path, dims=None, nan_key=None):
    import torch

    state = {k: torch.from_numpy(v) for k, v in
             lm_tensors(openai_rules(WHISPER, "encoder.")).items()}
    if nan_key:
        state[nan_key][0] = float("nan")
    torch.save({"dims": dict(DIMS, **(dims or {})), "model_state_dict": state}, path)
    return path


def test_openai_pt_fixture_loads(tmp_path):
    cfg, _ = load_whisper_encoder(str(write_openai_pt(tmp_path / "w.pt")))
    assert cfg.d_model == 16 and cfg.num_layers == 2


def test_openai_dims_without_n_mels(tmp_path):
    path = tmp_path / "w.pt"
    write_openai_pt(path)
    import torch

    ckpt = torch.load(path, weights_only=True)
    del ckpt["dims"]["n_mels"]
    torch.save(ckpt, path)
    e = one_error(load_whisper_encoder, str(path))
    assert str(e) == message(path, f"config: key 'dims.n_mels', in {path} "
                                   "(required field is missing)")


def test_openai_zero_heads(tmp_path):
    path = write_openai_pt(tmp_path / "w.pt", dims={"n_audio_head": 0})
    e = one_error(load_whisper_encoder, str(path))
    assert str(e) == message(path, "config: key 'dims.n_audio_head', expected an integer in "
                                   f"1..1024, got 0, in {path}")


def test_openai_nan_weight(tmp_path):
    key = "encoder.blocks.1.mlp.0.bias"
    path = write_openai_pt(tmp_path / "w.pt", nan_key=key)
    e = one_error(load_whisper_encoder, str(path))
    assert str(e) == message(path, f"corrupt: key '{key}', in {path} (1 NaN or infinite "
                                   "value(s) among 64 of shape (64,), first at index (0,))")


def test_hf_whisper_heads_not_dividing_width(tmp_path):
    d = tmp_path / "whisper"
    save_safetensors_sharded({"model.encoder.conv1.weight": np.zeros((16, 8, 3), np.float32)},
                             str(d))
    (d / "config.json").write_text(json.dumps(dict(
        model_type="whisper", num_mel_bins=8, d_model=16, encoder_layers=2,
        encoder_attention_heads=3, encoder_ffn_dim=64, max_source_positions=10)))
    e = one_error(load_whisper_encoder, str(d))
    origin = d / "config.json"
    assert str(e) == message(origin, "config: key 'encoder_attention_heads', expected a "
                                     f"divisor of the width 16, got 3, in {origin}")
