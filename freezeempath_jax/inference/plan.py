"""Per-device memory of one chat turn on meshes this machine does not have (compile only).

    python launch/chat_plan.py                          # 7B shape on 1, 4 and 8 devices
    python launch/chat_plan.py --meshes 1x4x1,1x8x1 --batch 4 --max-new-tokens 512

A chat turn as `ChatModel` runs it, in one jitted program: log-mel [B, n_mels, frames] ->
Whisper encoder, projector and emotion extractor -> prompt embeddings with the speech and
emotion embeddings spliced in -> LLM prefill -> the decode `while_loop` (`sampling`). It is
lowered from abstract arrays (`jax.ShapeDtypeStruct` with the shardings `ChatModel(mesh=)`
gives the parameters: logical names and training's rules), compiled, and
`compiled.memory_analysis()` read; nothing is allocated. Frozen parts are stored in
`param_dtype` (bfloat16, as the 7B config trains and serves them).

"argument" is XLA's figure for the inputs the program reads (jit drops unread ones: the
speech decoder, which this text turn does not run); "params held" is what the shardings
predict every parameter, the speech decoder included, occupies per device, i.e. what a
device holds between turns. The turn fits a device when params held + temp + output + code
stays under its memory.

With the default `--target cpu` the meshes are fake CPU devices (XLA_FLAGS
--xla_force_host_platform_device_count, set by launch/chat_plan.py before jax starts); the
CPU compiler's temporaries differ from TPU / GPU ones, the argument bytes do not.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from freezeempath_jax import sharding
from freezeempath_jax.checkpoints.model_tree import abstract_boxed_params
from freezeempath_jax.inference import sampling
from freezeempath_jax.models import presets
from freezeempath_jax.models.causal_lm import init_cache
from freezeempath_jax.models.configs import FreezeEmpathConfig, to_dtype
from freezeempath_jax.models.freezeempath import FreezeEmpath, SpeechFeatures

GIB = 1024 ** 3
DEFAULT_MESHES = "1x1x1,1x4x1,1x8x1"  # FSDP over every device, as configs/freezeempath_7b.py


def with_dtype(config: FreezeEmpathConfig, dtype: str) -> FreezeEmpathConfig:
    """`config` with every part computing in `dtype` (what `compute_dtype` does in training)."""
    def lm(c):
        return dataclasses.replace(c, dtype=dtype)
    kw = {"whisper": lm(config.whisper), "llm": lm(config.llm), "dtype": dtype}
    if config.speech_decoder is not None:
        kw["speech_decoder"] = dataclasses.replace(config.speech_decoder,
                                                   lm=lm(config.speech_decoder.lm))
    return dataclasses.replace(config, **kw)


@dataclasses.dataclass
class TurnPlan:
    """Per-device bytes of one compiled chat turn and the time to lower and compile it."""

    mesh: str
    devices: int
    argument: int = 0
    output: int = 0
    temp: int = 0
    code: int = 0
    params_held: int = 0  # predicted from the shardings: every parameter, per device
    params_total: int = 0  # global bytes of every parameter
    lower_s: float = 0.0
    compile_s: float = 0.0

    @property
    def total(self) -> int:
        """Bytes a device needs during the turn: held parameters (or the argument figure
        when larger), outputs, temporaries and the program."""
        return max(self.argument, self.params_held) + self.output + self.temp + self.code


def _shard_bytes(tree, shardings) -> int:
    def one(x, s):
        return int(np.prod(s.shard_shape(x.shape), dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return int(sum(jax.tree.leaves(jax.tree.map(one, tree, shardings))))


def turn_fn(config: FreezeEmpathConfig, max_new_tokens: int):
    """The pure `(params, mel, ids, mask, key, rules) -> (tokens, ser_logits)` of one text
    chat turn (greedy or sampled per `rules`; sampled here, the costlier mode)."""
    model = FreezeEmpath(config)
    mode = sampling.SamplingMode(greedy=False, filtered=True)

    def turn(params, mel, ids, mask, key, rules):
        speech, emotion, ser = model.apply({"params": params}, mel,
                                           method=FreezeEmpath.encode_speech)
        embeds = model.apply({"params": params}, ids, SpeechFeatures(speech, emotion, None),
                             method=FreezeEmpath.prompt_embeds)
        b, t = ids.shape
        cache = init_cache(config.llm, b, t + max_new_tokens - 1)
        state = sampling.prefill_state(config.llm, params["llm"], inputs_embeds=embeds,
                                       attention_mask=mask, cache=cache, key=key,
                                       max_new_tokens=max_new_tokens, mode=mode, rules=rules,
                                       keep_hidden=False)
        state = sampling.decode_until(config.llm, params["llm"], state, max_new_tokens, mode)
        return state.tokens, ser
    return turn


def plan_turn(config: FreezeEmpathConfig, mesh_shape: Sequence[int], devices=None, *,
              rules=sharding.DEFAULT_RULES, batch: int = 1, text_tokens: int = 32,
              max_new_tokens: int = 256,
              param_dtype: str = "bfloat16") -> TurnPlan:
    """Lowers and compiles one chat turn of `config` (parameters in `param_dtype`, computing
    in it too) on a mesh of `mesh_shape` (data, fsdp, tensor) over the first devices of
    `devices` (default all); returns its per-device memory. The clip is 30 s (what chat
    pads to); the prompt holds the speech and emotion placeholders plus `text_tokens` of
    chat frame, rounded up to a multiple of 32 (chat's prompt bucket)."""
    pool = list(jax.devices() if devices is None else devices)
    n = int(np.prod(mesh_shape))
    if len(pool) < n:
        raise ValueError(f"mesh {tuple(mesh_shape)} needs {n} devices, have {len(pool)} (set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax "
                         "is imported; launch/chat_plan.py does)")
    config = with_dtype(config, param_dtype)
    mesh = sharding.make_mesh(mesh_shape, devices=pool[:n])
    boxed = abstract_boxed_params(config)
    shardings = sharding.param_shardings(boxed, mesh, rules)
    dtype = to_dtype(param_dtype)
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(
            x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype, sharding=s),
        nn.meta.unbox(boxed), shardings)
    frames = 2 * config.whisper.max_source_positions  # 30 s: the clip length chat pads to
    prompt = int(-(-(config.num_speech_tokens + config.emotion.num_tokens + text_tokens)
                   // 32) * 32)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    args = (params,
            jax.ShapeDtypeStruct((batch, config.whisper.n_mels, frames), jnp.float32,
                                 sharding=rep),
            jax.ShapeDtypeStruct((batch, prompt), jnp.int32, sharding=rep),
            jax.ShapeDtypeStruct((batch, prompt), jnp.int32, sharding=rep),
            jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep),
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                         sampling.rules_of(sampling.SamplingConfig(0.7, 50, 0.9))))
    out = TurnPlan(mesh="x".join(map(str, mesh_shape)), devices=n,
                   params_held=_shard_bytes(params, shardings),
                   params_total=int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                                        for x in jax.tree.leaves(params))))
    fn = jax.jit(turn_fn(config, max_new_tokens))
    with sharding.mesh_rules(mesh, rules):
        tic = time.perf_counter()
        lowered = fn.lower(*args)
        out.lower_s = time.perf_counter() - tic
        tic = time.perf_counter()
        compiled = lowered.compile()
        out.compile_s = time.perf_counter() - tic
    m = compiled.memory_analysis()
    out.argument, out.output = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
    out.temp, out.code = int(m.temp_size_in_bytes), int(m.generated_code_size_in_bytes)
    return out


def table(plans: Sequence[TurnPlan]) -> str:
    """Markdown rows, GiB per device."""
    rows = ["| devices | mesh (data x fsdp x tensor) | params held | argument | temp | "
            "output + code | total | compile s |", "|---|---|---|---|---|---|---|---|"]
    for p in plans:
        rows.append(f"| {p.devices} | {p.mesh} | {p.params_held / GIB:.2f} | "
                    f"{p.argument / GIB:.2f} | {p.temp / GIB:.2f} | "
                    f"{(p.output + p.code) / GIB:.3f} | {p.total / GIB:.2f} | "
                    f"{p.lower_s + p.compile_s:.0f} |")
    return "\n".join(rows)


def main(argv: Optional[List[str]] = None) -> int:
    """Plans every mesh of `--meshes` and prints a Markdown table."""
    p = argparse.ArgumentParser(description="AOT memory plan of one chat turn")
    p.add_argument("--preset", default="FREEZEEMPATH_7B",
                   help="a FreezeEmpathConfig in models/presets.py")
    p.add_argument("--meshes", default=DEFAULT_MESHES,
                   help="comma-separated DATAxFSDPxTENSOR shapes")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    if not hasattr(presets, args.preset):
        raise SystemExit(f"--preset {args.preset!r} is not in models/presets.py")
    config = getattr(presets, args.preset)
    plans = []
    for text in filter(None, args.meshes.split(",")):
        plans.append(plan_turn(config, sharding.parse_mesh(text), batch=args.batch,
                               max_new_tokens=args.max_new_tokens, param_dtype=args.dtype))
        print(table(plans[-1:]).splitlines()[-1], flush=True)
    print()
    print(f"{args.preset}, batch {args.batch}, 30 s of audio, "
          f"{args.max_new_tokens} new tokens, parameters {args.dtype}; GiB per device")
    print(table(plans))
    return 0
