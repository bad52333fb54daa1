"""Causal LM weights (Qwen2 / Llama families) from Hugging Face directories and GGUF files."""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from freezeempath_jax.checkpoints.assemble import Rule, assemble, linear, unflatten
from freezeempath_jax.checkpoints.errors import CheckpointError, Problem, config_size
from freezeempath_jax.checkpoints.gguf_io import (SUPPORTED_ARCHS, GGUFSource, llama3_factor,
                                                  unpermute_qk)
from freezeempath_jax.checkpoints.model_tree import (causal_lm_init, dtype_name, make_placer,
                                                     verify)
from freezeempath_jax.checkpoints.formats import converted_kind
from freezeempath_jax.checkpoints.orbax_io import load_converted_part
from freezeempath_jax.checkpoints.safetensors_io import SafetensorsSource, read_config
from freezeempath_jax.models.configs import LMConfig

HF_ARCHS = ("qwen2", "llama")
ROPE_TYPES = (None, "default", "linear", "llama3")


def config_from_hf(cfg: dict, dtype, origin: str = "config.json") -> LMConfig:
    """LMConfig from a Hugging Face Qwen2 / Llama config dict (transformers 4.x or 5.x keys).

    Raises a CheckpointError for another architecture, an unsupported feature (RoPE
    scaling other than linear / llama3, MLP biases, sliding-window attention), or a size
    field that is missing, not an integer or out of `SIZE_LIMITS` (checked before anything
    is built from it).
    """
    problems = []
    mt = cfg.get("model_type")
    if mt not in HF_ARCHS:
        problems.append(Problem("architecture", key="model_type", file=origin,
                                expected=" or ".join(HF_ARCHS), actual=mt))
        raise CheckpointError(origin, problems)
    sizes = _hf_sizes(cfg, origin, problems)
    h, n = sizes["hidden_size"], sizes["num_heads"]
    rp = dict(cfg.get("rope_parameters") or {})  # transformers 5 folds theta + scaling here
    scaling = dict(cfg.get("rope_scaling") or rp)
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type not in ROPE_TYPES:
        problems.append(Problem("config", key="rope_scaling", file=origin,
                                expected="none, linear or llama3", actual=rope_type))
    if cfg.get("mlp_bias"):
        problems.append(Problem("config", key="mlp_bias", file=origin, expected=False,
                                actual=True))
    if mt == "qwen2" and cfg.get("use_sliding_window"):
        problems.append(Problem("config", key="use_sliding_window", file=origin,
                                expected=False, actual=True,
                                detail="sliding-window attention is not implemented"))
    if problems:
        raise CheckpointError(origin, problems)
    scaled = rope_type in ("linear", "llama3")
    return LMConfig(
        vocab_size=sizes["vocab_size"], hidden_size=h,
        intermediate_size=sizes["intermediate_size"],
        num_layers=sizes["num_layers"], num_heads=n,
        num_kv_heads=sizes["num_kv_heads"],
        head_dim=sizes["head_dim"],
        rope_theta=float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rope_scaling_type=rope_type if scaled else None,
        rope_scaling_factor=float(scaling.get("factor", 1.0)) if scaled else 1.0,
        rope_low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        rope_original_max_position=int(scaling.get("original_max_position_embeddings", 8192)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        qkv_bias=True if mt == "qwen2" else bool(cfg.get("attention_bias", False)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=sizes["max_position_embeddings"],
        param_dtype=dtype_name(dtype))


def _hf_sizes(cfg: dict, origin: str, problems: List[Problem]) -> dict:
    """The size fields of a Hugging Face LM config; each bad one is added to `problems`."""
    sizes = {ours: config_size(cfg, theirs, ours, origin, problems)
             for ours, theirs in (("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
                                  ("intermediate_size", "intermediate_size"),
                                  ("num_layers", "num_hidden_layers"),
                                  ("num_heads", "num_attention_heads"))}
    sizes["max_position_embeddings"] = config_size(cfg, "max_position_embeddings",
                                                   "max_position_embeddings", origin, problems,
                                                   default=32768)
    h, n = sizes["hidden_size"], sizes["num_heads"]
    # Falsy values fall back to the defaults, as they always have here.
    kv = (config_size(cfg, "num_key_value_heads", "num_kv_heads", origin, problems)
          if cfg.get("num_key_value_heads") else n)
    head_dim = (config_size(cfg, "head_dim", "head_dim", origin, problems)
                if cfg.get("head_dim") else (h // n if h and n else None))
    if n and kv and n % kv:
        problems.append(Problem("config", key="num_key_value_heads", file=origin,
                                expected=f"a divisor of num_attention_heads ({n})",
                                actual=kv))
    if head_dim == 0:
        problems.append(Problem("config", key="hidden_size", file=origin,
                                expected=f"at least num_attention_heads ({n})", actual=h))
    return dict(sizes, num_kv_heads=kv, head_dim=head_dim)


def hf_rules(c: LMConfig, base: str = "model.", head: str = "lm_head.weight") -> List[Rule]:
    """Hugging Face names: `base` + embed_tokens / layers.{i}.* / norm, and the `head` key."""
    H, N, K, D, F, L = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                        c.intermediate_size, c.num_layers)
    lay = base + "layers.{i}."
    rules = [Rule("embed_tokens/embedding", base + "embed_tokens.weight", (c.vocab_size, H)),
             Rule("layers/input_norm/scale", lay + "input_layernorm.weight", (H,), layers=L),
             Rule("layers/post_attn_norm/scale", lay + "post_attention_layernorm.weight", (H,),
                  layers=L),
             Rule("norm/scale", base + "norm.weight", (H,))]
    rules += linear("layers/attn/q_proj", lay + "self_attn.q_proj", N * D, H, c.qkv_bias, L,
                    out_shape=(N, D))
    rules += linear("layers/attn/k_proj", lay + "self_attn.k_proj", K * D, H, c.qkv_bias, L,
                    out_shape=(K, D))
    rules += linear("layers/attn/v_proj", lay + "self_attn.v_proj", K * D, H, c.qkv_bias, L,
                    out_shape=(K, D))
    rules += linear("layers/attn/o_proj", lay + "self_attn.o_proj", H, N * D, False, L,
                    in_shape=(N, D))
    rules += linear("layers/mlp/gate_proj", lay + "mlp.gate_proj", F, H, False, L)
    rules += linear("layers/mlp/up_proj", lay + "mlp.up_proj", F, H, False, L)
    rules += linear("layers/mlp/down_proj", lay + "mlp.down_proj", H, F, False, L)
    if not c.tie_embeddings:
        rules += linear("lm_head", head[: -len(".weight")], c.vocab_size, H, False)
    return rules


def hf_ignore(c: LMConfig, base: str = "model.", head: str = "lm_head.weight") -> List[str]:
    """Keys a Hugging Face LM may carry that we do not need (regexes)."""
    ign = [_re(base) + r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]
    if c.tie_embeddings:
        ign.append(_re(head))  # some tied checkpoints still store the (identical) head
    return ign


def _re(s: str) -> str:
    import re

    return re.escape(s)


def gguf_config(src: GGUFSource, dtype) -> Tuple[LMConfig, List[str]]:
    """(LMConfig, keys read for config only) from GGUF metadata (`{arch}.*` fields)."""
    arch = src.field("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(src.origin, [Problem(
            "architecture", key="general.architecture", file=src.origin,
            expected=" or ".join(SUPPORTED_ARCHS), actual=arch)])
    need = [f"{arch}.{k}" for k in ("block_count", "embedding_length", "feed_forward_length",
                                    "attention.head_count")]
    missing = [Problem("missing", key=k, file=src.origin, detail="metadata field")
               for k in need if src.field(k) is None]
    if "token_embd.weight" not in src:
        missing.append(Problem("missing", key="token_embd.weight", file=src.origin))
    if missing:
        raise CheckpointError(src.origin, missing)
    f = lambda k, default=None: src.field(f"{arch}.{k}", default)  # noqa: E731
    # Sizes are checked before anything is built from them (a head count of 0 or a block
    # count of millions is a corrupt file, not a model to allocate).
    sizes = {}
    for ours, theirs in (("hidden_size", "embedding_length"),
                         ("num_heads", "attention.head_count"),
                         ("intermediate_size", "feed_forward_length"),
                         ("num_layers", "block_count")):
        sizes[ours] = config_size(src.metadata, f"{arch}.{theirs}", ours, src.origin, missing)
    for ours, theirs in (("num_kv_heads", "attention.head_count_kv"),
                         ("head_dim", "attention.key_length"),
                         ("head_dim", "rope.dimension_count"),
                         ("max_position_embeddings", "context_length")):
        if f(theirs):  # absent or 0: the defaults below, as before
            config_size(src.metadata, f"{arch}.{theirs}", ours, src.origin, missing)
    if missing:
        raise CheckpointError(src.origin, missing)
    h, n = sizes["hidden_size"], sizes["num_heads"]
    d = int(f("attention.key_length") or f("rope.dimension_count") or h // n)
    if d == 0:
        raise CheckpointError(src.origin, [Problem(
            "config", key=f"{arch}.embedding_length", file=src.origin,
            expected=f"at least {arch}.attention.head_count ({n})", actual=h)])
    theta = float(f("rope.freq_base", 10000.0))
    config_keys = []
    scaling, factor, orig = None, 1.0, 8192
    if f("rope.scaling.type") == "linear":
        scaling, factor = "linear", float(f("rope.scaling.factor", 1.0))
    elif f("rope.scaling.type") not in (None, "none"):
        raise CheckpointError(src.origin, [Problem(
            "config", key=f"{arch}.rope.scaling.type", file=src.origin,
            expected="none or linear", actual=f("rope.scaling.type"))])
    if "rope_freqs.weight" in src:
        orig = int(f("rope.scaling.original_context_length", 8192))
        factor = llama3_factor(src.read("rope_freqs.weight"), d, theta, orig)
        if factor is None:
            raise CheckpointError(src.origin, [Problem(
                "config", key="rope_freqs.weight", file=src.origin,
                detail="RoPE frequency factors do not follow the llama3 rule")])
        scaling = "llama3"
        config_keys.append("rope_freqs.weight")
    cfg = LMConfig(
        vocab_size=src.shape("token_embd.weight")[0], hidden_size=h,
        intermediate_size=int(f("feed_forward_length")), num_layers=int(f("block_count")),
        num_heads=n, num_kv_heads=int(f("attention.head_count_kv") or n), head_dim=d,
        rope_theta=theta, rope_scaling_type=scaling, rope_scaling_factor=factor,
        rope_original_max_position=orig,
        rms_norm_eps=float(f("attention.layer_norm_rms_epsilon", 1e-6)),
        qkv_bias="blk.0.attn_q.bias" in src, tie_embeddings="output.weight" not in src,
        max_position_embeddings=int(f("context_length", 32768)), param_dtype=dtype_name(dtype))
    return cfg, config_keys


def gguf_rules(c: LMConfig, arch: str) -> List[Rule]:
    """llama.cpp tensor names; Q/K rows are un-permuted for llama-arch files."""
    H, N, K, D, F, L = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                        c.intermediate_size, c.num_layers)
    blk = "blk.{i}."
    rules = [Rule("embed_tokens/embedding", "token_embd.weight", (c.vocab_size, H)),
             Rule("layers/input_norm/scale", blk + "attn_norm.weight", (H,), layers=L),
             Rule("layers/post_attn_norm/scale", blk + "ffn_norm.weight", (H,), layers=L),
             Rule("norm/scale", "output_norm.weight", (H,))]
    permute = arch == "llama"
    for ours, theirs, heads in (("q_proj", "attn_q", N), ("k_proj", "attn_k", K),
                                ("v_proj", "attn_v", K)):
        fix = (lambda w, n=heads: unpermute_qk(w, n)) if permute and ours != "v_proj" else None
        rules.append(Rule(f"layers/attn/{ours}/kernel", f"{blk}{theirs}.weight", (heads * D, H),
                          lambda w, fix=fix, n=heads: np.ascontiguousarray(
                              (fix(w) if fix else w).T).reshape(H, n, D), L))
        if c.qkv_bias:
            rules.append(Rule(f"layers/attn/{ours}/bias", f"{blk}{theirs}.bias", (heads * D,),
                              lambda b, fix=fix, n=heads: (fix(b) if fix else b).reshape(n, D),
                              L))
    rules += linear("layers/attn/o_proj", blk + "attn_output", H, N * D, False, L,
                    in_shape=(N, D))
    rules += linear("layers/mlp/gate_proj", blk + "ffn_gate", F, H, False, L)
    rules += linear("layers/mlp/up_proj", blk + "ffn_up", F, H, False, L)
    rules += linear("layers/mlp/down_proj", blk + "ffn_down", H, F, False, L)
    if not c.tie_embeddings:
        rules += linear("lm_head", "output", c.vocab_size, H, False)
    return rules


def find_gguf(path: str) -> Optional[str]:
    """The .gguf file meant by `path` (the file, or the only .gguf in a directory)."""
    if os.path.isfile(path) and path.endswith(".gguf"):
        return path
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(found) == 1:
            return os.path.join(path, found[0])
    return None


def load_causal_lm(path, dtype=jnp.float32, *, shardings=None, mesh=None, rules=None
                   ) -> Tuple[LMConfig, dict]:
    """Causal LM `(LMConfig, params)` from a local checkpoint.

    path: a Hugging Face Qwen2 / Llama directory (config.json + safetensors, sharded with
    `model.safetensors.index.json` or single), a `.gguf` file (any quantization the `gguf`
    package dequantizes; llama-arch Q/K permutation undone), or a directory converted to our
    format (`convert --kind llm`).
    dtype: dtype of the returned parameters.
    shardings / mesh / rules: placement of each finished leaf (see `whisper.load_whisper_encoder`).
    """
    path = os.fspath(path)
    if converted_kind(path) is not None:  # our own format (`convert --kind llm`)
        return load_converted_part(path, "llm", lambda _: dtype, shardings=shardings,
                                   mesh=mesh, rules=rules)
    gguf_path = find_gguf(path)
    if gguf_path:
        src = GGUFSource(gguf_path)
        cfg, config_keys = gguf_config(src, dtype)
        key_rules = gguf_rules(cfg, src.field("general.architecture"))
        ignore = [k.replace(".", r"\.") for k in config_keys]
    elif os.path.isdir(path):
        cfg = config_from_hf(read_config(path), dtype, os.path.join(path, "config.json"))
        src = SafetensorsSource(path)
        key_rules, ignore = hf_rules(cfg), hf_ignore(cfg)
    else:
        raise CheckpointError(path, [Problem("file", file=path, detail=(
            "no such file or directory" if not os.path.exists(path) else
            "expected a Hugging Face directory or a .gguf file"))])
    init = causal_lm_init(cfg)
    flat = assemble(src, key_rules, dtype, placer=make_placer(init, shardings, mesh, rules),
                    ignore=ignore)
    verify(flat, init, path)
    return cfg, unflatten(flat)
