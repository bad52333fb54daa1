"""The release's units-to-waveform decoder folder -> `(UnitDecoderConfig, params)`.

    config.yaml                  semantic codec + s2mel configuration (IndexTTS2 layout)
    semantic_codec.safetensors   MaskGCT RepCodec (only the quantizer's codebook is used)
    s2mel.pth                    {"net": {"cfm": ..., "length_regulator": ...}}
    bigvgan_generator.pt         {"generator": BigVGAN v2 state}
    style.pt, prompt_condition.pt, ref_mel.pt   the fixed voice

Pickles are read with `torch.load(weights_only=True)` (no pickled code runs). Every missing
file, missing key and mis-shaped tensor is reported in one CheckpointError. A directory that
`convert --kind unit_decoder` wrote (our orbax format) loads too.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from freezeempath_jax.checkpoints.bigvgan import (StateReader, config_from_state,
                                                  conv_kernel, linear_kernel,
                                                  read_bigvgan_state, torch_load)
from freezeempath_jax.checkpoints import formats, orbax_io
from freezeempath_jax.checkpoints.assemble import flatten
from freezeempath_jax.checkpoints.errors import CheckpointError, Problem
from freezeempath_jax.checkpoints.sources import (DictSource, PrefixedSource, TensorSource,
                                                  torch_to_numpy)
from freezeempath_jax.models import configs as C
from freezeempath_jax.models.unit_decoder import init_params

FILES = ("config.yaml", "semantic_codec.safetensors", "s2mel.pth", "bigvgan_generator.pt",
         "style.pt", "prompt_condition.pt", "ref_mel.pt")


def config_from_yaml(doc: dict) -> C.UnitDecoderConfig:
    """UnitDecoderConfig from IndexTTS2-style YAML (`semantic_codec` and `s2mel` sections;
    the s2mel keys may also sit at the top level)."""
    codec = doc.get("semantic_codec") or {}
    s2 = doc.get("s2mel") or doc
    lr, dit, wn = s2.get("length_regulator") or {}, s2.get("DiT") or {}, s2.get("wavenet") or {}
    style = s2.get("style_encoder") or {}
    base = C.UnitDecoderConfig()

    def pick(cls_default, mapping: dict, names: Dict[str, str]):
        return dataclasses.replace(cls_default, **{ours: mapping[theirs]
                                                   for ours, theirs in names.items()
                                                   if theirs in mapping})

    cfg = dataclasses.replace(
        base,
        codec=pick(base.codec, codec, {"codebook_size": "codebook_size",
                                       "codebook_dim": "codebook_dim",
                                       "hidden_size": "hidden_size"}),
        length_regulator=pick(base.length_regulator, lr, {
            "channels": "channels", "in_channels": "in_channels",
            "sampling_ratios": "sampling_ratios"}),
        dit=pick(base.dit, {**dit, **{"wn_" + k: v for k, v in wn.items()},
                            **{"style_" + k: v for k, v in style.items()}}, {
            "hidden_dim": "hidden_dim", "num_heads": "num_heads", "depth": "depth",
            "in_channels": "in_channels", "content_dim": "content_dim",
            "style_condition": "style_condition", "style_as_token": "style_as_token",
            "time_as_token": "time_as_token", "uvit_skip_connection": "uvit_skip_connection",
            "long_skip_connection": "long_skip_connection",
            "final_layer_type": "final_layer_type", "style_dim": "style_dim",
            "wavenet_hidden_dim": "wn_hidden_dim", "wavenet_num_layers": "wn_num_layers",
            "wavenet_kernel_size": "wn_kernel_size",
            "wavenet_dilation_rate": "wn_dilation_rate"}))
    problems = []
    if lr.get("is_discrete") or lr.get("f0_condition") or lr.get("vector_quantize"):
        problems.append("length_regulator: only continuous input without f0 or VQ is supported")
    if dit.get("is_causal") or dit.get("zero_prompt_speech_token"):
        problems.append("DiT: is_causal / zero_prompt_speech_token are not supported")
    if s2.get("dit_type", "DiT") != "DiT":
        problems.append(f"dit_type {s2.get('dit_type')!r}: only 'DiT' exists")
    if problems:
        raise ValueError("; ".join(problems))
    return cfg


def read_codec(src: TensorSource, c: C.SemanticCodecConfig, file: str) -> StateReader:
    r = StateReader(src, file)
    q = "quantizer.quantizers.0."
    r.tensor("codebook", q + "codebook.weight", (c.codebook_size, c.codebook_dim))
    r.weight("out_project_kernel", q + "out_project.", (c.hidden_size, c.codebook_dim, 1),
             lambda w: w[:, :, 0].T)
    r.tensor("out_project_bias", q + "out_project.bias", (c.hidden_size,))
    return r


def read_length_regulator(src: TensorSource, c: C.LengthRegulatorConfig, file: str,
                          prefix: str = "length_regulator.") -> StateReader:
    r = StateReader(src, file, prefix)
    ch, n = c.channels, len(c.sampling_ratios)
    r.weight("content_in_proj/kernel", "content_in_proj.", (ch, c.in_channels), linear_kernel)
    r.tensor("content_in_proj/bias", "content_in_proj.bias", (ch,))
    for i in range(n):  # model = [conv, GroupNorm, Mish] * n + [1x1 conv]
        r.weight(f"conv_{i}/kernel", f"model.{3 * i}.", (ch, ch, 3), conv_kernel)
        r.tensor(f"conv_{i}/bias", f"model.{3 * i}.bias", (ch,))
        r.tensor(f"norm_{i}_scale", f"model.{3 * i + 1}.weight", (ch,))
        r.tensor(f"norm_{i}_bias", f"model.{3 * i + 1}.bias", (ch,))
    out = c.out_channels or ch
    r.weight("conv_out/kernel", f"model.{3 * n}.", (out, ch, 1), lambda w: w[:, :, 0].T)
    r.tensor("conv_out/bias", f"model.{3 * n}.bias", (out,))
    return r


def read_dit(src: TensorSource, c: C.DiTConfig, file: str,
             prefix: str = "cfm.estimator.") -> StateReader:
    r = StateReader(src, file, prefix)

    def linear(path, module, n_out, n_in, bias=True):
        r.weight(path + "/kernel", module + ".", (n_out, n_in), linear_kernel)
        if bias:
            r.tensor(path + "/bias", module + ".bias", (n_out,))

    def t_embedder(path, module, d):
        linear(path + "/mlp_0", module + ".mlp.0", d, c.frequency_embedding_size)
        linear(path + "/mlp_2", module + ".mlp.2", d, d)

    def ada_norm(path, module, d):
        r.tensor(path + "/weight", module + ".norm.weight", (d,))
        linear(path + "/project_layer", module + ".project_layer", 2 * d, d)

    d, hd = c.hidden_dim, c.head_dim
    t_embedder("t_embedder", "t_embedder", d)
    linear("cond_projection", "cond_projection", d, c.content_dim)
    merge_in = d + 2 * c.in_channels + (c.style_dim if c.style_condition and
                                        not c.style_as_token else 0)
    linear("cond_x_merge_linear", "cond_x_merge_linear", d, merge_in)
    if c.style_as_token:
        linear("style_in", "style_in", d, c.style_dim)
    for i in range(c.depth):
        p, m = f"layers_{i}", f"transformer.layers.{i}"
        if c.uvit_skip_connection and i > c.depth // 2:
            linear(p + "/skip_in_linear", m + ".skip_in_linear", d, 2 * d)
        ada_norm(p + "/attention_norm", m + ".attention_norm", d)
        ada_norm(p + "/ffn_norm", m + ".ffn_norm", d)
        linear(p + "/wqkv", m + ".attention.wqkv", 3 * c.num_heads * hd, d, bias=False)
        linear(p + "/wo", m + ".attention.wo", d, c.num_heads * hd, bias=False)
        f = c.intermediate_size
        linear(p + "/w1", m + ".feed_forward.w1", f, d, bias=False)
        linear(p + "/w3", m + ".feed_forward.w3", f, d, bias=False)
        linear(p + "/w2", m + ".feed_forward.w2", d, f, bias=False)
    ada_norm("norm", "transformer.norm", d)
    if c.long_skip_connection:
        linear("skip_linear", "skip_linear", d, d + c.in_channels)
    if c.final_layer_type == "wavenet":
        h, n, k = c.wavenet_hidden_dim, c.wavenet_num_layers, c.wavenet_kernel_size
        linear("conv1", "conv1", h, d)
        t_embedder("t_embedder2", "t_embedder2", h)
        squeeze = lambda w: w[:, :, 0].T  # noqa: E731 - 1x1 conv as a Dense kernel
        r.weight("wavenet/cond_layer/kernel", "wavenet.cond_layer.conv.conv.", (2 * h * n, h, 1),
                 squeeze)
        r.tensor("wavenet/cond_layer/bias", "wavenet.cond_layer.conv.conv.bias", (2 * h * n,))
        for i in range(n):
            m = f"wavenet.in_layers.{i}.conv.conv."
            r.weight(f"wavenet/in_layers_{i}_kernel", m, (2 * h, h, k), conv_kernel)
            r.tensor(f"wavenet/in_layers_{i}_bias", m + "bias", (2 * h,))
            m = f"wavenet.res_skip_layers.{i}.conv.conv."
            rs = h if i == n - 1 else 2 * h
            r.weight(f"wavenet/res_skip_layers_{i}/kernel", m, (rs, h, 1), squeeze)
            r.tensor(f"wavenet/res_skip_layers_{i}/bias", m + "bias", (rs,))
        linear("res_projection", "res_projection", h, d)
        linear("final_adaLN_modulation", "final_layer.adaLN_modulation.1", 2 * h, h)
        linear("final_linear", "final_layer.linear", h, h)
        r.weight("conv2/kernel", "conv2.", (c.in_channels, h, 1), squeeze)
        r.tensor("conv2/bias", "conv2.bias", (c.in_channels,))
    else:
        linear("final_mlp_0", "final_mlp.0", d, d)
        linear("final_mlp_2", "final_mlp.2", c.in_channels, d)
    return r


def _voice_tensor(path: str, name: str, problems, want_rank: int):
    """A voice tensor (batch axis of 1 dropped) or None with a problem recorded."""
    try:
        obj = torch_load(path)
    except CheckpointError as e:
        problems += e.problems
        return None
    if isinstance(obj, dict) and len(obj) == 1:
        obj = next(iter(obj.values()))
    if not hasattr(obj, "shape"):
        problems.append(Problem("corrupt", key=name, file=path, detail="not a tensor"))
        return None
    arr = np.asarray(torch_to_numpy(obj), np.float32)
    if arr.ndim == want_rank + 1 and arr.shape[0] == 1:
        arr = arr[0]
    return arr


def _net(obj, path: str):
    """s2mel.pth -> {part: state dict} (accepts {"net": {...}} or the parts at top level;
    DataParallel's `module.` prefixes are dropped)."""
    net = obj.get("net", obj) if isinstance(obj, dict) else None
    if not isinstance(net, dict):
        raise CheckpointError(path, [Problem("missing", key="net", file=path)])
    flat = {}
    for part, sd in net.items():
        if isinstance(sd, dict):
            for k, v in sd.items():
                k = k[len("module."):] if k.startswith("module.") else k
                flat[f"{part}.{k}"] = v
    return flat


def load_unit_decoder(folder, dtype=jnp.float32) -> Tuple[C.UnitDecoderConfig, Dict]:
    """`(UnitDecoderConfig, params)` of the release's decoder folder or of a directory that
    `convert --kind unit_decoder` wrote (see the module docstring for the layout), or
    `(UnitCodecConfig, params)` of a folder `save_unit_codec` wrote."""
    import yaml  # only the release folder needs it

    folder = os.fspath(folder)
    kind = formats.converted_kind(folder)
    if kind == "unit_codec":  # the demo's own codec (`models.unit_codec`)
        return load_unit_codec(folder)
    if kind is not None:
        return _load_converted(folder, dtype)
    missing = [Problem("file", file=os.path.join(folder, f), detail="file not found")
               for f in FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise CheckpointError(folder, missing)
    cfg_path = os.path.join(folder, "config.yaml")
    try:
        with open(cfg_path) as f:
            cfg = config_from_yaml(yaml.safe_load(f) or {})
    except (ValueError, yaml.YAMLError) as e:
        raise CheckpointError(folder, [Problem("config", file=cfg_path, detail=str(e))]) from e

    from freezeempath_jax.checkpoints.safetensors_io import SafetensorsSource

    problems = []
    codec_file = os.path.join(folder, "semantic_codec.safetensors")
    readers = {"codec": read_codec(SafetensorsSource(codec_file), cfg.codec, codec_file)}
    s2_file = os.path.join(folder, "s2mel.pth")
    s2 = DictSource(_net(torch_load(s2_file, folder), s2_file), s2_file, torch_to_numpy)
    readers["length_regulator"] = read_length_regulator(
        PrefixedSource(s2, "length_regulator."), cfg.length_regulator, s2_file)
    readers["dit"] = read_dit(PrefixedSource(s2, "cfm.estimator."), cfg.dit, s2_file)
    bv_file = os.path.join(folder, "bigvgan_generator.pt")
    gen = torch_load(bv_file, folder)
    gen = gen.get("generator", gen) if isinstance(gen, dict) else gen
    bsrc = DictSource(gen if isinstance(gen, dict) else {}, bv_file, torch_to_numpy)
    cfg = dataclasses.replace(cfg, bigvgan=config_from_state(bsrc, cfg.bigvgan))
    readers["bigvgan"] = read_bigvgan_state(bsrc, cfg.bigvgan, bv_file)

    d = cfg.dit
    voice = {}
    for name, rank in (("style", 1), ("prompt_condition", 2), ("ref_mel", 2)):
        voice[name] = _voice_tensor(os.path.join(folder, name + ".pt"), name, problems, rank)
    if voice["ref_mel"] is not None:
        voice["ref_mel"] = voice["ref_mel"].T  # [n_mels, P] -> [P, n_mels]
    p = voice["ref_mel"].shape[0] if voice["ref_mel"] is not None else None
    want = {"style": (d.style_dim,), "prompt_condition": (p, d.content_dim),
            "ref_mel": (p, d.in_channels)}
    for name, arr in voice.items():
        if arr is not None and p is not None and tuple(arr.shape) != want[name]:
            shown = arr.T.shape if name == "ref_mel" else arr.shape
            expect = (want[name][1], p) if name == "ref_mel" else want[name]
            problems.append(Problem("shape", key=name, expected=tuple(expect),
                                    actual=tuple(shown), file=os.path.join(folder, name + ".pt")))
    for r in readers.values():
        problems += r.problems
    if problems:
        raise CheckpointError(folder, problems)
    params = {name: r.finish(folder, dtype) for name, r in readers.items()}
    params["voice"] = {k: jnp.asarray(v, dtype) for k, v in voice.items()}
    return dataclasses.replace(cfg, prompt_frames=int(p)), params


def _load_converted(folder: str, dtype):

    kind, cfg = formats.load_config(folder)
    if kind != "unit_decoder":
        raise CheckpointError(folder, [Problem("architecture", key="kind", expected="unit_decoder",
                                               actual=kind)])
    want = flatten(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))),
                   is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    got = flatten(orbax_io.restore_params(folder),
                  is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    problems = [Problem("missing", key=k, file=folder) for k in want if k not in got]
    problems += [Problem("unexpected", key=k, file=folder) for k in got if k not in want]
    problems += [Problem("shape", key=k, expected=tuple(want[k].shape), actual=tuple(got[k].shape),
                         file=folder) for k in want if k in got and
                 tuple(want[k].shape) != tuple(got[k].shape)]
    if problems:
        raise CheckpointError(folder, problems)
    from freezeempath_jax.checkpoints.assemble import unflatten

    return cfg, unflatten({k: jnp.asarray(v, dtype) for k, v in got.items()})


def save_unit_codec(folder, config: C.UnitCodecConfig, params, overwrite: bool = True) -> str:
    """Writes the demo's unit codec (`models.unit_codec`) in our format (orbax params +
    config.json of kind "unit_codec"); `load_unit_decoder` / `load_unit_codec` read it."""
    return orbax_io.save_params(os.fspath(folder), {k: np.asarray(v) for k, v in
                                                    params.items()},
                                config=config, kind="unit_codec", overwrite=overwrite)


def load_unit_codec(folder) -> Tuple[C.UnitCodecConfig, Dict]:
    """(UnitCodecConfig, params) of a folder `save_unit_codec` wrote; CheckpointError naming
    every missing, unexpected or mis-shaped parameter."""
    from freezeempath_jax.models import unit_codec

    folder = os.fspath(folder)
    kind, cfg = formats.load_config(folder)
    if kind != "unit_codec":
        raise CheckpointError(folder, [Problem("architecture", key="kind",
                                               expected="unit_codec", actual=kind)])
    want = flatten(jax.eval_shape(lambda: unit_codec.init_params(cfg, jax.random.key(0))),
                   is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    got = flatten(orbax_io.restore_params(folder),
                  is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    problems = [Problem("missing", key=k, file=folder) for k in want if k not in got]
    problems += [Problem("unexpected", key=k, file=folder) for k in got if k not in want]
    problems += [Problem("shape", key=k, expected=tuple(want[k].shape),
                         actual=tuple(got[k].shape), file=folder)
                 for k in want if k in got and tuple(want[k].shape) != tuple(got[k].shape)]
    if problems:
        raise CheckpointError(folder, problems)
    from freezeempath_jax.checkpoints.assemble import unflatten

    return cfg, unflatten({k: jnp.asarray(v, jnp.float32) for k, v in got.items()})
