"""Whisper decoder weights (the ASR half) from the same three formats as the encoder.

Hugging Face (`model.decoder.*`), OpenAI-whisper (`decoder.*` in a `.pt` with `dims`) and
CTranslate2 (`decoder/*`) each become a key table into `models.WhisperDecoder`'s tree
(`embed_tokens`, `embed_positions`, scanned `layers/{self_attn,cross_attn,mlp,...}`, `ln`).
The output projection is tied to the token embedding in every released Whisper, so
`proj_out.weight` / `decoder/projection/weight` (an alias in CTranslate2) is not read.

`load_whisper(path)` reads both halves and, where the checkpoint holds them, the tokenizer
and the token-suppression lists the reference decoders apply (`WhisperASRInfo`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from freezeempath_jax.checkpoints.assemble import Rule, assemble, linear, unflatten
from freezeempath_jax.checkpoints.ctranslate2_io import CTranslate2Source
from freezeempath_jax.checkpoints.errors import REQUIRED, CheckpointError, Problem, config_size
from freezeempath_jax.checkpoints.model_tree import dtype_name, make_placer, verify
from freezeempath_jax.checkpoints.safetensors_io import SafetensorsSource, read_config
from freezeempath_jax.checkpoints.whisper import (HEAD_DIM, _check_ct2_weight_types,
                                                  _openai_source, detect_format,
                                                  load_whisper_encoder)
from freezeempath_jax.models.configs import WhisperConfig, WhisperDecoderConfig
from freezeempath_jax.models.whisper_decoder import WhisperDecoder


def decoder_init(config: WhisperDecoderConfig):
    """Init function of the decoder's tree (shapes only are used by `verify`)."""
    return lambda: WhisperDecoder(config).init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32),
        encoder_states=jnp.zeros((1, 1, config.d_model), jnp.float32))


def _attn_rules(c: WhisperDecoderConfig, ours: str, names: dict, sep: str = ".") -> List[Rule]:
    """q/k/v/out of one attention (separate tensors; k unbiased)."""
    d, h, L = c.d_model, c.num_heads, c.num_layers
    hd = d // h
    rules = []
    for proj, bias in (("q_proj", True), ("k_proj", False), ("v_proj", True)):
        rules += linear(f"layers/{ours}/{proj}", names[proj], d, d, bias=bias, layers=L,
                        out_shape=(h, hd), sep=sep)
    return rules + linear(f"layers/{ours}/out_proj", names["out_proj"], d, d, layers=L,
                          in_shape=(h, hd), sep=sep)


def _ln_rules(c: WhisperDecoderConfig, ours: str, theirs: str, names=("weight", "bias"),
              sep: str = ".") -> List[Rule]:
    d, L = c.d_model, c.num_layers
    return [Rule(f"layers/{ours}/scale", f"{theirs}{sep}{names[0]}", (d,), layers=L),
            Rule(f"layers/{ours}/bias", f"{theirs}{sep}{names[1]}", (d,), layers=L)]


def hf_decoder_rules(c: WhisperDecoderConfig, p: str = "model.decoder.") -> List[Rule]:
    """Hugging Face names under prefix `p` ("model.decoder." or "decoder.")."""
    d, L = c.d_model, c.num_layers
    lay = p + "layers.{i}."
    rules = [Rule("embed_tokens/embedding", p + "embed_tokens.weight", (c.vocab_size, d)),
             Rule("embed_positions", p + "embed_positions.weight", (c.max_target_positions, d)),
             Rule("ln/scale", p + "layer_norm.weight", (d,)),
             Rule("ln/bias", p + "layer_norm.bias", (d,))]
    for ours, theirs in (("self_attn", "self_attn"), ("cross_attn", "encoder_attn")):
        rules += _attn_rules(c, ours, {k: f"{lay}{theirs}.{k}" for k in
                                       ("q_proj", "k_proj", "v_proj", "out_proj")})
    rules += _ln_rules(c, "self_attn_ln", lay + "self_attn_layer_norm")
    rules += _ln_rules(c, "cross_attn_ln", lay + "encoder_attn_layer_norm")
    rules += _ln_rules(c, "mlp_ln", lay + "final_layer_norm")
    rules += linear("layers/mlp/fc1", lay + "fc1", c.mlp_dim, d, layers=L)
    rules += linear("layers/mlp/fc2", lay + "fc2", d, c.mlp_dim, layers=L)
    return rules


def openai_decoder_rules(c: WhisperDecoderConfig, p: str = "decoder.") -> List[Rule]:
    """OpenAI-whisper names (`decoder.blocks.{i}.attn.query` ...)."""
    d, L = c.d_model, c.num_layers
    blk = p + "blocks.{i}."
    rules = [Rule("embed_tokens/embedding", p + "token_embedding.weight", (c.vocab_size, d)),
             Rule("embed_positions", p + "positional_embedding", (c.max_target_positions, d)),
             Rule("ln/scale", p + "ln.weight", (d,)), Rule("ln/bias", p + "ln.bias", (d,))]
    names = {"q_proj": "query", "k_proj": "key", "v_proj": "value", "out_proj": "out"}
    for ours, theirs in (("self_attn", "attn"), ("cross_attn", "cross_attn")):
        rules += _attn_rules(c, ours, {k: f"{blk}{theirs}.{v}" for k, v in names.items()})
    rules += _ln_rules(c, "self_attn_ln", blk + "attn_ln")
    rules += _ln_rules(c, "cross_attn_ln", blk + "cross_attn_ln")
    rules += _ln_rules(c, "mlp_ln", blk + "mlp_ln")
    rules += linear("layers/mlp/fc1", blk + "mlp.0", c.mlp_dim, d, layers=L)
    rules += linear("layers/mlp/fc2", blk + "mlp.2", d, c.mlp_dim, layers=L)
    return rules


def _fused(target: str, source: str, rows: int, d: int, part: int, heads: int,
           layers: int, what: str) -> Rule:
    """Slice `part` (d rows each) of a fused [rows, d] weight or [rows] bias."""
    hd = d // heads
    if what == "weight":
        return Rule(target, source, (rows, d), lambda w: np.ascontiguousarray(
            w[part * d:(part + 1) * d].T).reshape(d, heads, hd), layers)
    return Rule(target, source, (rows,), lambda b: b[part * d:(part + 1) * d].reshape(
        heads, hd), layers)


def ct2_decoder_rules(c: WhisperDecoderConfig) -> List[Rule]:
    """CTranslate2 WhisperSpec decoder names. Self-attention q/k/v are fused in
    `self_attention/linear_0` [3d, d]; cross-attention has q in `attention/linear_0` and k/v
    fused in `attention/linear_1` [2d, d]. The k slices of the fused biases are dropped: they
    are zeros from the converters, and a key bias only adds a per-query constant that softmax
    ignores."""
    d, h, L, f = c.d_model, c.num_heads, c.num_layers, c.mlp_dim
    lay = "decoder/layer_{i}/"
    rules = [Rule("embed_tokens/embedding", "decoder/embeddings/weight", (c.vocab_size, d)),
             Rule("embed_positions", "decoder/position_encodings/encodings",
                  (c.max_target_positions, d)),
             Rule("ln/scale", "decoder/layer_norm/gamma", (d,)),
             Rule("ln/bias", "decoder/layer_norm/beta", (d,))]
    sa, ca = lay + "self_attention/", lay + "attention/"
    for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        rules.append(_fused(f"layers/self_attn/{proj}/kernel", sa + "linear_0/weight", 3 * d, d,
                            j, h, L, "weight"))
        if proj != "k_proj":
            rules.append(_fused(f"layers/self_attn/{proj}/bias", sa + "linear_0/bias", 3 * d,
                                d, j, h, L, "bias"))
    rules += linear("layers/self_attn/out_proj", sa + "linear_1", d, d, layers=L,
                    in_shape=(h, d // h), sep="/")
    rules += linear("layers/cross_attn/q_proj", ca + "linear_0", d, d, layers=L,
                    out_shape=(h, d // h), sep="/")
    rules.append(_fused("layers/cross_attn/k_proj/kernel", ca + "linear_1/weight", 2 * d, d, 0,
                        h, L, "weight"))
    rules.append(_fused("layers/cross_attn/v_proj/kernel", ca + "linear_1/weight", 2 * d, d, 1,
                        h, L, "weight"))
    rules.append(_fused("layers/cross_attn/v_proj/bias", ca + "linear_1/bias", 2 * d, d, 1, h,
                        L, "bias"))
    rules += linear("layers/cross_attn/out_proj", ca + "linear_2", d, d, layers=L,
                    in_shape=(h, d // h), sep="/")
    rules += linear("layers/mlp/fc1", lay + "ffn/linear_0", f, d, layers=L, sep="/")
    rules += linear("layers/mlp/fc2", lay + "ffn/linear_1", d, f, layers=L, sep="/")
    for ours, theirs in (("self_attn_ln", "self_attention"), ("cross_attn_ln", "attention"),
                         ("mlp_ln", "ffn")):
        rules += _ln_rules(c, ours, f"{lay}{theirs}/layer_norm", ("gamma", "beta"), "/")
    return rules


# Scalars and aliases CTranslate2 stores beside the decoder weights (metadata, not tensors
# of the network): they must neither be reported as unexpected nor read as weights.
_CT2_DECODER_META = (r"decoder/(activation|alibi|alignment_heads|alignment_layer|num_heads|"
                     r"pre_norm|scale_embeddings|start_from_zero_embedding|projection/weight)")


def _config(sizes: dict, dtype) -> WhisperDecoderConfig:
    return WhisperDecoderConfig(param_dtype=dtype_name(dtype), **sizes)


def _checked(cfg: dict, fields, origin: str, where: str = "") -> dict:
    problems: List[Problem] = []
    limits = {"vocab_size": "vocab_size", "d_model": "d_model", "num_layers": "num_layers",
              "num_heads": "num_heads", "mlp_dim": "mlp_dim",
              "max_target_positions": "max_source_positions"}
    sizes = {ours: config_size(cfg, theirs, limits[ours], origin, problems,
                               default=REQUIRED, name=where + theirs)
             for ours, theirs in fields}
    if problems:
        raise CheckpointError(origin, problems)
    if sizes["d_model"] % sizes["num_heads"]:
        raise CheckpointError(origin, [Problem(
            "config", key=where + dict(fields)["num_heads"], file=origin,
            actual=sizes["num_heads"], expected=f"a divisor of the width {sizes['d_model']}")])
    return sizes


def _shapes_config(src, emb: str, pos: str, fc1: str, layer_re: str, heads, dtype
                   ) -> WhisperDecoderConfig:
    missing = [Problem("missing", key=k, file=src.origin, detail="needed to infer the config")
               for k in (emb, pos, fc1) if k not in src]
    if missing:
        raise CheckpointError(src.origin, missing)
    v, d = src.shape(emb)
    pattern = re.compile(layer_re)
    layers = {int(m.group(1)) for k in src.keys() for m in [pattern.fullmatch(k)] if m}
    heads = heads or max(1, d // HEAD_DIM)
    if isinstance(heads, bool) or heads < 1 or d % heads:
        raise CheckpointError(src.origin, [Problem(
            "config", key="decoder/num_heads", file=src.origin, actual=repr(heads),
            expected=f"a positive divisor of the decoder width {d}")])
    return _config(dict(vocab_size=v, d_model=d, num_layers=len(layers), num_heads=int(heads),
                        mlp_dim=src.shape(fc1)[0], max_target_positions=src.shape(pos)[0]),
                   dtype)


def load_whisper_decoder(path, dtype=jnp.float32) -> Tuple[WhisperDecoderConfig, dict]:
    """Whisper decoder `(WhisperDecoderConfig, params)` from a Hugging Face Whisper directory
    (WhisperForConditionalGeneration or WhisperModel), an OpenAI-whisper `.pt` file or a
    CTranslate2 directory (float weights). Raises CheckpointError listing every missing,
    unexpected or mis-shaped decoder key."""
    path = os.fspath(path)
    fmt = detect_format(path)
    ignore: Tuple[str, ...] = ()
    if fmt == "hf":
        hf = read_config(path)
        src = SafetensorsSource(path)
        prefix = "model.decoder." if "model.decoder.embed_tokens.weight" in src else "decoder."
        cfg = _config(_checked(hf, (("vocab_size", "vocab_size"), ("d_model", "d_model"),
                                    ("num_layers", "decoder_layers"),
                                    ("num_heads", "decoder_attention_heads"),
                                    ("mlp_dim", "decoder_ffn_dim"),
                                    ("max_target_positions", "max_target_positions")),
                               os.path.join(path, "config.json")), dtype)
        rules = hf_decoder_rules(cfg, prefix)
        scope = lambda k: k.startswith(prefix) or k == "proj_out.weight"  # noqa: E731
        ignore = (r"proj_out\.weight",)
    elif fmt == "openai":
        dims, src = _openai_source(path)
        sizes = _checked(dims, (("vocab_size", "n_vocab"), ("d_model", "n_text_state"),
                                ("num_layers", "n_text_layer"), ("num_heads", "n_text_head"),
                                ("max_target_positions", "n_text_ctx")), path, "dims.")
        cfg = _config(dict(sizes, mlp_dim=4 * sizes["d_model"]), dtype)  # OpenAI: 4 x width
        rules = openai_decoder_rules(cfg)
        scope = lambda k: k.startswith("decoder.")  # noqa: E731
    else:
        src = CTranslate2Source(path)
        heads = int(src.read("decoder/num_heads")) if "decoder/num_heads" in src else None
        cfg = _shapes_config(src, "decoder/embeddings/weight",
                             "decoder/position_encodings/encodings",
                             "decoder/layer_0/ffn/linear_0/weight",
                             r"decoder/layer_(\d+)/ffn/linear_0/weight", heads, dtype)
        rules = ct2_decoder_rules(cfg)
        scope = lambda k: k.startswith("decoder/")  # noqa: E731
        ignore = (_CT2_DECODER_META,)
        _check_ct2_weight_types(src, rules)
    init = decoder_init(cfg)
    flat = assemble(src, rules, dtype, placer=make_placer(init), scope=scope, ignore=ignore)
    verify(flat, init, path)
    return cfg, unflatten(flat)


@dataclasses.dataclass(frozen=True)
class WhisperASRInfo:
    """What a checkpoint says about decoding besides its weights.

    tokenizer_file: `tokenizer.json` beside the weights (None when absent).
    suppress_ids: ids never generated (CTranslate2 `suppress_ids`, Hugging Face
        `generation_config.json` `suppress_tokens`); suppress_ids_begin: ids not generated
        as the first token (`suppress_ids_begin` / `begin_suppress_tokens`).
    """

    tokenizer_file: Optional[str] = None
    suppress_ids: Tuple[int, ...] = ()
    suppress_ids_begin: Tuple[int, ...] = ()


def _asr_info(path: str) -> WhisperASRInfo:
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    tok = os.path.join(folder, "tokenizer.json")
    sup, begin = (), ()
    for name, keys in (("config.json", ("suppress_ids", "suppress_ids_begin")),
                       ("generation_config.json", ("suppress_tokens", "begin_suppress_tokens"))):
        f = os.path.join(folder, name)
        if not os.path.isfile(f) or not os.path.isdir(path):
            continue
        try:
            with open(f) as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and keys[0] in data:
            sup = tuple(int(i) for i in data.get(keys[0]) or ())
            begin = tuple(int(i) for i in data.get(keys[1]) or ())
            break
    return WhisperASRInfo(tok if os.path.isfile(tok) else None, sup, begin)


def load_whisper(path, dtype=jnp.float32
                 ) -> Tuple[Tuple[WhisperConfig, WhisperDecoderConfig], dict, WhisperASRInfo]:
    """Both halves of a Whisper checkpoint: `((encoder config, decoder config),
    {"encoder": params, "decoder": params}, WhisperASRInfo)` (formats as
    `load_whisper_decoder`)."""
    enc_cfg, enc = load_whisper_encoder(path, dtype)
    dec_cfg, dec = load_whisper_decoder(path, dtype)
    if enc_cfg.d_model != dec_cfg.d_model:
        raise CheckpointError(os.fspath(path), [Problem(
            "config", key="d_model", file=os.fspath(path), actual=dec_cfg.d_model,
            expected=f"the encoder width {enc_cfg.d_model}")])
    return (enc_cfg, dec_cfg), {"encoder": enc, "decoder": dec}, _asr_info(os.fspath(path))
