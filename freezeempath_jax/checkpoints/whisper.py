"""Whisper encoder weights from Hugging Face, OpenAI-whisper and CTranslate2 checkpoints.

All three are the same network under different names; each becomes a key table (`Rule`s)
into the tree of docs/params.md (`conv1`, `conv2`, `embed_positions`, scanned `layers/...`,
`ln_post`). Only encoder keys are read: decoders of full seq2seq checkpoints are ignored.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from freezeempath_jax.checkpoints.assemble import Rule, assemble, linear, unflatten
from freezeempath_jax.checkpoints.ctranslate2_io import (MODEL_FILE, CTranslate2Source,
                                                         write_model_bin)
from freezeempath_jax.checkpoints.errors import REQUIRED, CheckpointError, Problem, config_size
from freezeempath_jax.checkpoints.model_tree import (dtype_name, make_placer, verify,
                                                     whisper_init)
from freezeempath_jax.checkpoints.formats import converted_kind
from freezeempath_jax.checkpoints.orbax_io import load_converted_part
from freezeempath_jax.checkpoints.safetensors_io import SafetensorsSource, read_config
from freezeempath_jax.checkpoints.sources import DictSource, TensorSource, torch_to_numpy
from freezeempath_jax.models.configs import WhisperConfig

# Every Whisper size has 64-wide heads; used where a format does not store the head count.
HEAD_DIM = 64


def _conv(w):
    # torch Conv1d weight [out, in, k] -> flax Conv kernel [k, in, out]
    return np.ascontiguousarray(np.transpose(w, (2, 1, 0)))


def _block_rules(c: WhisperConfig, attn: Dict[str, str], ln: Dict[str, str],
                 sep: str = ".", ln_names=("weight", "bias")) -> List[Rule]:
    """Per-layer rules given source templates for q/k/v/out, fc1/fc2 and the two norms."""
    d, h, L = c.d_model, c.num_heads, c.num_layers
    hd = d // h
    rules = []
    for ours, bias in (("q_proj", True), ("k_proj", False), ("v_proj", True)):
        rules += linear(f"layers/attn/{ours}", attn[ours], d, d, bias=bias, layers=L,
                        out_shape=(h, hd))
    rules += linear("layers/attn/out_proj", attn["out_proj"], d, d, layers=L, in_shape=(h, hd))
    rules += linear("layers/mlp/fc1", attn["fc1"], c.mlp_dim, d, layers=L)
    rules += linear("layers/mlp/fc2", attn["fc2"], d, c.mlp_dim, layers=L)
    for ours in ("attn_ln", "mlp_ln"):
        rules += [Rule(f"layers/{ours}/scale", f"{ln[ours]}{sep}{ln_names[0]}", (d,), layers=L),
                  Rule(f"layers/{ours}/bias", f"{ln[ours]}{sep}{ln_names[1]}", (d,), layers=L)]
    return rules


def hf_rules(c: WhisperConfig, p: str) -> List[Rule]:
    """Hugging Face names under prefix `p` ("model.encoder.", "encoder." or "")."""
    d = c.d_model
    lay = p + "layers.{i}."
    rules = [Rule("conv1/kernel", p + "conv1.weight", (d, c.n_mels, 3), _conv),
             Rule("conv1/bias", p + "conv1.bias", (d,)),
             Rule("conv2/kernel", p + "conv2.weight", (d, d, 3), _conv),
             Rule("conv2/bias", p + "conv2.bias", (d,)),
             Rule("embed_positions", p + "embed_positions.weight", (c.max_source_positions, d)),
             Rule("ln_post/scale", p + "layer_norm.weight", (d,)),
             Rule("ln_post/bias", p + "layer_norm.bias", (d,))]
    attn = {"q_proj": lay + "self_attn.q_proj", "k_proj": lay + "self_attn.k_proj",
            "v_proj": lay + "self_attn.v_proj", "out_proj": lay + "self_attn.out_proj",
            "fc1": lay + "fc1", "fc2": lay + "fc2"}
    ln = {"attn_ln": lay + "self_attn_layer_norm", "mlp_ln": lay + "final_layer_norm"}
    return rules + _block_rules(c, attn, ln)


def openai_rules(c: WhisperConfig, p: str) -> List[Rule]:
    """OpenAI-whisper names under prefix `p` ("encoder." or "model.speech_encoder.")."""
    d = c.d_model
    blk = p + "blocks.{i}."
    rules = [Rule("conv1/kernel", p + "conv1.weight", (d, c.n_mels, 3), _conv),
             Rule("conv1/bias", p + "conv1.bias", (d,)),
             Rule("conv2/kernel", p + "conv2.weight", (d, d, 3), _conv),
             Rule("conv2/bias", p + "conv2.bias", (d,)),
             Rule("embed_positions", p + "positional_embedding", (c.max_source_positions, d)),
             Rule("ln_post/scale", p + "ln_post.weight", (d,)),
             Rule("ln_post/bias", p + "ln_post.bias", (d,))]
    attn = {"q_proj": blk + "attn.query", "k_proj": blk + "attn.key",
            "v_proj": blk + "attn.value", "out_proj": blk + "attn.out",
            "fc1": blk + "mlp.0", "fc2": blk + "mlp.2"}
    ln = {"attn_ln": blk + "attn_ln", "mlp_ln": blk + "mlp_ln"}
    return rules + _block_rules(c, attn, ln)


def ct2_rules(c: WhisperConfig) -> List[Rule]:
    """CTranslate2 WhisperSpec encoder names; q/k/v are fused in `linear_0` ([3d, d]).

    The fused bias has a k part (zeros from the converters); dropping it is exact anyway:
    q . b_k is the same for every key, and softmax ignores a per-row constant.
    """
    d, h, L, f = c.d_model, c.num_heads, c.num_layers, c.mlp_dim
    hd = d // h
    lay = "encoder/layer_{i}/"
    rules = [Rule("conv1/kernel", "encoder/conv1/weight", (d, c.n_mels, 3), _conv),
             Rule("conv1/bias", "encoder/conv1/bias", (d,)),
             Rule("conv2/kernel", "encoder/conv2/weight", (d, d, 3), _conv),
             Rule("conv2/bias", "encoder/conv2/bias", (d,)),
             Rule("embed_positions", "encoder/position_encodings/encodings",
                  (c.max_source_positions, d)),
             Rule("ln_post/scale", "encoder/layer_norm/gamma", (d,)),
             Rule("ln_post/bias", "encoder/layer_norm/beta", (d,))]
    qkv_w = lay + "self_attention/linear_0/weight"
    qkv_b = lay + "self_attention/linear_0/bias"
    for j, ours in enumerate(("q_proj", "k_proj", "v_proj")):
        rules.append(Rule(f"layers/attn/{ours}/kernel", qkv_w, (3 * d, d),
                          lambda w, j=j: np.ascontiguousarray(
                              w[j * d:(j + 1) * d].T).reshape(d, h, hd), L))
        if ours != "k_proj":
            rules.append(Rule(f"layers/attn/{ours}/bias", qkv_b, (3 * d,),
                              lambda b, j=j: b[j * d:(j + 1) * d].reshape(h, hd), L))
    rules += linear("layers/attn/out_proj", lay + "self_attention/linear_1", d, d, layers=L,
                    in_shape=(h, hd), sep="/")
    rules += linear("layers/mlp/fc1", lay + "ffn/linear_0", f, d, layers=L, sep="/")
    rules += linear("layers/mlp/fc2", lay + "ffn/linear_1", d, f, layers=L, sep="/")
    for ours, theirs in (("attn_ln", "self_attention"), ("mlp_ln", "ffn")):
        rules += [Rule(f"layers/{ours}/scale", f"{lay}{theirs}/layer_norm/gamma", (d,), layers=L),
                  Rule(f"layers/{ours}/bias", f"{lay}{theirs}/layer_norm/beta", (d,), layers=L)]
    return rules


# ---------------------------------------------------------------------------- configs


_DEFAULTS = {"num_mel_bins": 80, "max_source_positions": 1500}


def _checked_sizes(cfg: dict, fields, origin: str, where: str = "") -> dict:
    """{our size name: value} for `fields` ((ours, theirs) pairs), every one checked against
    `SIZE_LIMITS` and d_model against the head count; one CheckpointError lists every bad
    field (named `where` + theirs) of the file `origin`."""
    problems: List[Problem] = []
    sizes = {ours: config_size(cfg, theirs, ours, origin, problems,
                               default=_DEFAULTS.get(theirs, REQUIRED), name=where + theirs)
             for ours, theirs in fields}
    if problems:
        raise CheckpointError(origin, problems)
    if sizes["d_model"] % sizes["num_heads"]:
        heads = dict((o, t) for o, t in fields)["num_heads"]
        raise CheckpointError(origin, [Problem(
            "config", key=where + heads, file=origin, actual=sizes["num_heads"],
            expected=f"a divisor of the width {sizes['d_model']}")])
    return sizes


def config_from_hf(cfg: dict, dtype, origin: str = "config.json") -> WhisperConfig:
    """WhisperConfig from a Hugging Face Whisper config.json dict (sizes checked)."""
    s = _checked_sizes(cfg, (("n_mels", "num_mel_bins"), ("d_model", "d_model"),
                             ("num_layers", "encoder_layers"),
                             ("num_heads", "encoder_attention_heads"),
                             ("mlp_dim", "encoder_ffn_dim"),
                             ("max_source_positions", "max_source_positions")), origin)
    return WhisperConfig(
        n_mels=s["n_mels"], d_model=s["d_model"], num_layers=s["num_layers"],
        num_heads=s["num_heads"], mlp_dim=s["mlp_dim"],
        max_source_positions=s["max_source_positions"], param_dtype=dtype_name(dtype))


def config_from_openai_dims(dims: dict, dtype, origin: str = "dims") -> WhisperConfig:
    """WhisperConfig from OpenAI-whisper `dims` (n_mels, n_audio_ctx/state/head/layer)."""
    s = _checked_sizes(dims, (("n_mels", "n_mels"), ("d_model", "n_audio_state"),
                              ("num_layers", "n_audio_layer"), ("num_heads", "n_audio_head"),
                              ("max_source_positions", "n_audio_ctx")), origin, "dims.")
    return WhisperConfig(n_mels=s["n_mels"], d_model=s["d_model"],
                         num_layers=s["num_layers"], num_heads=s["num_heads"],
                         mlp_dim=4 * s["d_model"],
                         max_source_positions=s["max_source_positions"],
                         param_dtype=dtype_name(dtype))


def config_from_shapes(src: TensorSource, conv1: str, pos: str, fc1: str, layer_re: str,
                       dtype, num_heads: Optional[int] = None) -> WhisperConfig:
    """WhisperConfig inferred from tensor shapes (formats that store no dimensions)."""
    problems = [Problem("missing", key=k, file=src.origin, detail="needed to infer the config")
                for k in (conv1, pos, fc1) if k not in src]
    if problems:
        raise CheckpointError(src.origin, problems)
    d, n_mels, _ = src.shape(conv1)
    pattern = re.compile(layer_re)
    layers = {int(m.group(1)) for k in src.keys() for m in [pattern.fullmatch(k)] if m}
    heads = num_heads or max(1, d // HEAD_DIM)
    # A stored head count (CTranslate2 `encoder/num_heads`, the release's
    # speech_encoder_num_heads) is data too: 0 or a non-divisor would fail deep in a reshape.
    if (isinstance(heads, bool) or not isinstance(heads, (int, np.integer)) or heads < 1
            or d % heads):
        raise CheckpointError(src.origin, [Problem(
            "config", key="num_heads", file=src.origin, actual=repr(heads),
            expected=f"a positive divisor of the encoder width {d}")])
    return WhisperConfig(n_mels=n_mels, d_model=d, num_layers=len(layers),
                         num_heads=int(heads), mlp_dim=src.shape(fc1)[0],
                         max_source_positions=src.shape(pos)[0], param_dtype=dtype_name(dtype))


# ---------------------------------------------------------------------------- formats


def detect_format(path: str) -> str:
    """"hf" | "openai" | "ctranslate2" for a Whisper checkpoint path (or CheckpointError)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if path.endswith((".pt", ".pth", ".bin")) and not _is_ct2(path):
            return "openai"
        if _is_ct2(path):
            return "ctranslate2"
        raise CheckpointError(path, [Problem("architecture", file=path,
                                             detail="not an OpenAI .pt or CTranslate2 file")])
    if not os.path.isdir(path):
        raise CheckpointError(path, [Problem("file", file=path, detail="no such file or "
                                                                       "directory")])
    if _is_ct2(os.path.join(path, MODEL_FILE)):
        return "ctranslate2"
    return "hf"


def _is_ct2(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        head = f.read(4)
    # torch files start with a zip ("PK") or pickle (0x80) magic; CT2 with a small version
    return len(head) == 4 and 1 <= int.from_bytes(head, "little") <= 64


def _openai_source(path: str) -> Tuple[dict, TensorSource]:
    import torch  # torch is needed for this format only

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # older non-zip pickles cannot be mmapped
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(path, [Problem("corrupt", file=path,
                                                 detail=f"torch.load failed: {e}")]) from e
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        got = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(path, [Problem("architecture", file=path,
                                             expected="a dict with 'dims' and "
                                                      "'model_state_dict'", actual=got)])
    bad = [Problem("corrupt", key=k, file=path, expected="a dict",
                   actual=type(ckpt[k]).__name__)
           for k in ("dims", "model_state_dict") if not isinstance(ckpt[k], dict)]
    if bad:
        raise CheckpointError(path, bad)
    return dict(ckpt["dims"]), DictSource(ckpt["model_state_dict"], path, torch_to_numpy)


def encoder_rules_for(src: TensorSource, origin: str, dtype, hf_config: Optional[dict] = None,
                      num_heads: Optional[int] = None,
                      prefixes=("model.encoder.", "encoder.", "")) -> Tuple[WhisperConfig,
                                                                             List[Rule], str]:
    """(config, rules, prefix) for an HF or OpenAI-named encoder found in `src`."""
    for p in prefixes:
        if p + "conv1.weight" in src:
            if p + "blocks.0.attn.query.weight" in src or p + "positional_embedding" in src:
                cfg = config_from_shapes(src, p + "conv1.weight", p + "positional_embedding",
                                         p + "blocks.0.mlp.0.weight", re.escape(p) +
                                         r"blocks\.(\d+)\.attn\.query\.weight", dtype, num_heads)
                return cfg, openai_rules(cfg, p), p
            if hf_config is not None:
                cfg = config_from_hf(hf_config, dtype, os.path.join(origin, "config.json"))
            else:
                cfg = config_from_shapes(src, p + "conv1.weight", p + "embed_positions.weight",
                                         p + "layers.0.fc1.weight", re.escape(p) +
                                         r"layers\.(\d+)\.fc1\.weight", dtype, num_heads)
            return cfg, hf_rules(cfg, p), p
    raise CheckpointError(origin, [Problem(
        "missing", key=" | ".join(p + "conv1.weight" for p in prefixes), file=origin,
        detail="no Whisper encoder found (looked for these conv1 keys)")])


def load_whisper_encoder(path, dtype=jnp.float32, *, shardings=None, mesh=None, rules=None
                         ) -> Tuple[WhisperConfig, dict]:
    """Whisper encoder `(WhisperConfig, params)` from a local checkpoint.

    path: a Hugging Face Whisper directory (config.json + safetensors, single or sharded;
    full seq2seq or encoder only), an OpenAI-whisper `.pt` file, or a CTranslate2 directory
    (`model.bin` + `config.json`; float32/float16/bfloat16 weights, not int8/int16), or a
    directory converted to our format (`convert --kind whisper`).
    dtype: dtype of the returned parameters.
    shardings / mesh / rules: where each leaf is placed as it is finished (see `Placer`);
    with only `mesh`, the model's logical axis names and `rules` decide.
    Raises CheckpointError listing every missing, unexpected or mis-shaped key.
    """
    path = os.fspath(path)
    if converted_kind(path) is not None:  # our own format (`convert --kind whisper`)
        return load_converted_part(path, "whisper", lambda _: dtype, shardings=shardings,
                                   mesh=mesh, rules=rules)
    fmt = detect_format(path)
    if fmt == "hf":
        hf_cfg = read_config(path)
        if hf_cfg.get("model_type") not in (None, "whisper"):
            raise CheckpointError(path, [Problem(
                "architecture", key="model_type", file=os.path.join(path, "config.json"),
                expected="whisper", actual=hf_cfg.get("model_type"))])
        src = SafetensorsSource(path)
        cfg, key_rules, prefix = encoder_rules_for(src, path, dtype, hf_config=hf_cfg)
        scope = _encoder_scope(prefix)
    elif fmt == "openai":
        dims, src = _openai_source(path)
        cfg = config_from_openai_dims(dims, dtype, path)
        key_rules, scope = openai_rules(cfg, "encoder."), _encoder_scope("encoder.")
    else:
        src = CTranslate2Source(path)
        heads = None
        if "encoder/num_heads" in src:
            heads = int(src.read("encoder/num_heads"))
        cfg = config_from_shapes(src, "encoder/conv1/weight",
                                 "encoder/position_encodings/encodings",
                                 "encoder/layer_0/ffn/linear_0/weight",
                                 r"encoder/layer_(\d+)/ffn/linear_0/weight", dtype, heads)
        key_rules = ct2_rules(cfg)
        scope = lambda k: k.startswith("encoder/") and k != "encoder/num_heads"  # noqa: E731
        _check_ct2_weight_types(src, key_rules)
    init = whisper_init(cfg)
    flat = assemble(src, key_rules, dtype, placer=make_placer(init, shardings, mesh, rules),
                    scope=scope)
    verify(flat, init, path)
    return cfg, unflatten(flat)


def _encoder_scope(prefix: str):
    if prefix:
        return lambda k: k.startswith(prefix)
    # encoder-only checkpoint without prefix: everything belongs to the encoder
    return lambda k: not k.startswith(("decoder.", "model.decoder.", "proj_out."))


def _check_ct2_weight_types(src: CTranslate2Source, key_rules: List[Rule]) -> None:
    bad = []
    for r in key_rules:
        for k in r.keys():
            if k in src and src.dtype(k) in ("int8", "int16", "int32"):
                bad.append(Problem("dtype", key=k, file=src.origin, expected="float32/float16/"
                                   "bfloat16", actual=src.dtype(k),
                                   detail="quantized CTranslate2 weights are not supported; "
                                          "re-convert with --quantization float16"))
    if bad:
        raise CheckpointError(src.origin, bad)


def save_whisper_encoder_ct2(out_dir: str, config: WhisperConfig, params: dict,
                             dtype=np.float16) -> str:
    """Writes our encoder params as a CTranslate2 WhisperSpec encoder (`model.bin` +
    `config.json`) that `load_whisper_encoder` reads back. Returns the model.bin path.

    Only the encoder is written: CTranslate2 itself needs the decoder too to run it.
    """
    c = config
    d, h, L = c.d_model, c.num_heads, c.num_layers
    dt = np.dtype(dtype)

    def a(x):
        return np.asarray(x, np.float32).astype(dt)

    def conv(k):  # [k, in, out] -> [out, in, k]
        return a(np.transpose(np.asarray(k, np.float32), (2, 1, 0)))

    lay = params["layers"]
    v: Dict[str, np.ndarray] = {
        "encoder/conv1/bias": a(params["conv1"]["bias"]),
        "encoder/conv1/weight": conv(params["conv1"]["kernel"]),
        "encoder/conv2/bias": a(params["conv2"]["bias"]),
        "encoder/conv2/weight": conv(params["conv2"]["kernel"]),
    }
    for i in range(L):
        p = f"encoder/layer_{i}/"
        get = lambda *ks: np.asarray(_dig(lay, ks)[i], np.float32)  # noqa: E731
        v[p + "ffn/layer_norm/beta"] = a(get("mlp_ln", "bias"))
        v[p + "ffn/layer_norm/gamma"] = a(get("mlp_ln", "scale"))
        v[p + "ffn/linear_0/bias"] = a(get("mlp", "fc1", "bias"))
        v[p + "ffn/linear_0/weight"] = a(get("mlp", "fc1", "kernel").T)
        v[p + "ffn/linear_1/bias"] = a(get("mlp", "fc2", "bias"))
        v[p + "ffn/linear_1/weight"] = a(get("mlp", "fc2", "kernel").T)
        v[p + "self_attention/layer_norm/beta"] = a(get("attn_ln", "bias"))
        v[p + "self_attention/layer_norm/gamma"] = a(get("attn_ln", "scale"))
        qkv = [get("attn", n, "kernel").reshape(d, d).T for n in ("q_proj", "k_proj", "v_proj")]
        v[p + "self_attention/linear_0/bias"] = a(np.concatenate([
            get("attn", "q_proj", "bias").reshape(d), np.zeros(d, np.float32),
            get("attn", "v_proj", "bias").reshape(d)]))
        v[p + "self_attention/linear_0/weight"] = a(np.concatenate(qkv, 0))
        v[p + "self_attention/linear_1/bias"] = a(get("attn", "out_proj", "bias"))
        v[p + "self_attention/linear_1/weight"] = a(
            get("attn", "out_proj", "kernel").reshape(d, d).T)
    v["encoder/layer_norm/beta"] = a(params["ln_post"]["bias"])
    v["encoder/layer_norm/gamma"] = a(params["ln_post"]["scale"])
    v["encoder/num_heads"] = np.asarray(h, np.int16)
    v["encoder/position_encodings/encodings"] = a(params["embed_positions"])
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, MODEL_FILE)
    write_model_bin(path, "WhisperSpec", 3, v)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({}, f)
    return path


def _dig(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree
