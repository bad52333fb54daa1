"""Causal LM loading: Hugging Face Qwen2 / Llama directories (sharded, tied or not, RoPE
scaling) and GGUF files written with the `gguf` package (llama-arch Q/K permutation, Q8_0 /
F16 tensors, llama3 `rope_freqs`), each against the torch model's logits.

Positions start at 5000 so that RoPE scaling changes the logits measurably.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from freezeempath_jax.checkpoints import load_causal_lm
from freezeempath_jax.checkpoints.gguf_io import permute_qk
from freezeempath_jax.models.causal_lm import CausalLM

T, START = 12, 5000
TOL = 2e-4  # float32; measured ~2e-6 relative to logits of order 1
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 1024}


def tiny_lm(kind, tie, rope=None, seed=0):
    import transformers as tf

    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
              tie_word_embeddings=tie, rms_norm_eps=1e-5)
    if rope:
        kw["rope_parameters"] = dict(rope, rope_theta=10000.0)
    cfg = tf.Qwen2Config(**kw) if kind == "qwen2" else tf.LlamaConfig(**kw)
    torch.manual_seed(seed)
    model = (tf.Qwen2ForCausalLM if kind == "qwen2" else tf.LlamaForCausalLM)(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return model


def ids():
    return np.random.default_rng(1).integers(0, 96, (2, T)).astype(np.int32)


@torch.no_grad()
def torch_logits(model, x):
    pos = torch.arange(START, START + T)[None].expand(x.shape[0], -1)
    return model(torch.as_tensor(x, dtype=torch.long), position_ids=pos).logits.numpy()


@functools.lru_cache(maxsize=None)
def _forward(cfg):
    return jax.jit(lambda p, x, pos: CausalLM(cfg).apply({"params": p}, input_ids=x,
                                                         positions=pos).logits)


def our_logits(cfg, params, x):
    pos = np.broadcast_to(np.arange(START, START + T), x.shape).astype(np.int32)
    return np.asarray(_forward(cfg)(params, x, pos))


def assert_close(ours, ref, tol=TOL):
    err = np.abs(ours - ref).max()
    assert err < tol * max(1.0, np.abs(ref).max()), f"max abs error {err}"


@pytest.mark.parametrize("kind,tie,rope", [("qwen2", False, None), ("llama", True, LLAMA3),
                                           ("llama", False, {"rope_type": "linear",
                                                             "factor": 4.0})])
def test_hf_sharded(tmp_path, kind, tie, rope):
    model = tiny_lm(kind, tie, rope)
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    cfg, params = load_causal_lm(str(tmp_path))
    assert cfg.qkv_bias == (kind == "qwen2") and cfg.tie_embeddings == tie
    assert cfg.rope_scaling_type == (rope or {}).get("rope_type")
    assert ("lm_head" in params) == (not tie)
    x = ids()
    assert_close(our_logits(cfg, params, x), torch_logits(model, x))


def test_transformers4_config_keys(tmp_path):
    """The release (transformers 4.43) writes rope_theta / rope_scaling, not rope_parameters."""
    model = tiny_lm("llama", True, LLAMA3)
    model.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    doc = json.loads(cfg_path.read_text())
    rp = doc.pop("rope_parameters")
    doc["rope_theta"] = rp.pop("rope_theta")
    doc["rope_scaling"] = rp
    cfg_path.write_text(json.dumps(doc))
    cfg, params = load_causal_lm(str(tmp_path))
    assert (cfg.rope_scaling_type, cfg.rope_scaling_factor, cfg.rope_original_max_position) == (
        "llama3", 8.0, 1024)
    x = ids()
    assert_close(our_logits(cfg, params, x), torch_logits(model, x))


def test_bf16_params(tmp_path):
    model = tiny_lm("qwen2", False)
    model.save_pretrained(tmp_path)
    cfg, params = load_causal_lm(str(tmp_path), dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    x = ids()
    ref = torch_logits(model, x)
    assert np.abs(our_logits(cfg, params, x) - ref).max() < 0.05 * np.abs(ref).max()


# ------------------------------------------------------------------------------- GGUF

def write_gguf(path, model, arch, quantize=(), rope_freqs=None):
    """A llama.cpp-style GGUF of a transformers model (llama arch: Q/K rows permuted).

    Tensors whose GGUF name contains one of `quantize` are stored as Q8_0. Returns the state
    dict the file really holds (Q8_0 round trip applied), for the torch reference.
    """
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight",
                 "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj.weight": "attn_output.weight",
                 "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                 "mlp.down_proj.weight": "ffn_down.weight"}
    held = {}
    sd = model.state_dict()
    for key, t in sd.items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if key.startswith("model.layers."):
            i, rest = key[len("model.layers."):].split(".", 1)
            stem = next(v for k, v in per_layer.items() if rest.startswith(k))
            name = f"blk.{i}.{stem}" + ("" if stem.endswith(".weight") else
                                        "." + rest.rsplit(".", 1)[1])
        else:
            name = names[key]
        a = t.detach().float().numpy().copy()
        if any(q in name for q in quantize) and a.ndim == 2:
            qa = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            a = gguf.quants.dequantize(qa, gguf.GGMLQuantizationType.Q8_0).reshape(a.shape)
        held[key] = a
        out = a
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            heads = c.num_attention_heads if ".attn_q." in name else c.num_key_value_heads
            out = permute_qk(a, heads)
        if any(q in name for q in quantize) and out.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(out, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif out.ndim == 2 and "ffn_up" in name:
            w.add_tensor(name, out.astype(np.float16))
        else:
            w.add_tensor(name, out.astype(np.float32))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def torch_with(model, held):
    with torch.no_grad():
        model.load_state_dict({k: torch.as_tensor(v) for k, v in held.items()}, strict=False)
    return model


@pytest.mark.parametrize("arch,tie", [("llama", True), ("qwen2", False)])
def test_gguf(tmp_path, arch, tie):
    model = tiny_lm(arch, tie)
    held = write_gguf(tmp_path / "m.gguf", model, arch, quantize=("attn_q", "ffn_gate", "token"))
    cfg, params = load_causal_lm(str(tmp_path / "m.gguf"))
    assert cfg.tie_embeddings == tie and cfg.qkv_bias == (arch == "qwen2")
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (3, 4, 2, 16)
    x = ids()
    assert_close(our_logits(cfg, params, x), torch_logits(torch_with(model, held), x))


def test_gguf_llama3_rope_freqs(tmp_path):
    """llama.cpp stores llama3 RoPE scaling as per-frequency divisors (`rope_freqs`)."""
    from freezeempath_jax.models.layers import rope_inv_freq

    model = tiny_lm("llama", True, dict(LLAMA3, original_max_position_embeddings=8192))
    base = rope_inv_freq(16, 10000.0)
    divisors = base / rope_inv_freq(16, 10000.0, "llama3", 8.0, 1.0, 4.0, 8192)
    assert len(set(np.round(divisors, 3))) > 2  # low, high and smoothed bands all present
    held = write_gguf(tmp_path / "m.gguf", model, "llama", rope_freqs=divisors)
    cfg, params = load_causal_lm(str(tmp_path / "m.gguf"))
    assert (cfg.rope_scaling_type, cfg.rope_scaling_factor) == ("llama3", 8.0)
    x = ids()
    assert_close(our_logits(cfg, params, x), torch_logits(torch_with(model, held), x))


# ------------------------------------------------------------------------- left padding

@functools.lru_cache(maxsize=None)
def _forward_masked(cfg):
    # no positions passed: the model derives them from the mask (positions_from_mask)
    return jax.jit(lambda p, x, m: CausalLM(cfg).apply({"params": p}, input_ids=x,
                                                       attention_mask=m).logits)


@pytest.mark.parametrize("kind,tie", [("qwen2", False), ("llama", True)])
def test_left_padded_batch_matches_transformers(tmp_path, kind, tie):
    """Two rows of different lengths, left-padded (mask zeros on the left), as batched
    generation feeds them. transformers does not derive positions from the mask (it uses
    arange), so it gets position_ids = cumsum(mask) - 1 clipped at 0 explicitly; ours derive
    the same from the mask. Logits must agree on the real tokens, and a padded row must give
    what it gives alone, unpadded.

    RoPE scores depend on position differences only, so what this pins down is the masking
    (without the mask the real tokens move by ~0.3 on logits of ~0.5); equal positions keep
    the comparison exact and match what a cache continuation relies on."""
    model = tiny_lm(kind, tie)
    model.save_pretrained(tmp_path)
    cfg, params = load_causal_lm(str(tmp_path))
    lengths = (T, T - 5)
    x = ids()
    mask = np.zeros((2, T), np.int32)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
    x = np.where(mask > 0, x, 0).astype(np.int32)  # pad id 0 (never attended to)
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)

    ours = np.asarray(_forward_masked(cfg)(params, x, mask))
    with torch.no_grad():
        ref = model(torch.as_tensor(x, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                    position_ids=torch.as_tensor(pos, dtype=torch.long)).logits.numpy()
        alone = model(torch.as_tensor(x[1:, T - lengths[1]:], dtype=torch.long)).logits.numpy()
    real = mask > 0
    assert np.isfinite(ours[real]).all()
    assert_close(ours[real], ref[real])
    assert_close(ours[1, T - lengths[1]:], alone[0])
