"""Ahead-of-time memory plan of the sharded train step for meshes this machine does not have.

    configs/*.py -> defaults.resolve -> make_train_step on a mesh of (fake) devices
    -> step.lower(abstract state, frozen, batch) -> compile -> memory_analysis per device

Every input is a `jax.ShapeDtypeStruct`: no parameter, optimizer or batch memory is ever
allocated, so the 7B configuration plans on a laptop. XLA reports, for one device of the
SPMD-partitioned program, the bytes of its arguments (its shard of the train state, of the
frozen parameters and of the batch), outputs, aliased outputs (the donated state), temporaries
(activations, gradients, collectives' buffers) and generated code. Their sum is what one
accelerator must hold, before allocator fragmentation and the runtime's own reserve.

Fake devices: `XLA_FLAGS=--xla_force_host_platform_device_count=N` must be in the environment
before jax creates its CPU backend; `launch/aot_plan.py` sets it from the largest requested
mesh before importing jax. Smaller meshes use the first devices of that pool.

What to trust: argument and output sizes follow from the shardings alone and match any
backend. Temporaries do not: the CPU compiler runs bf16 work in fp32 and fuses differently, so
its temp is 2-5x what the GPU compiler reports for the same program (7B stage 1, one device,
batch 16: 40.8 GiB on CPU, 7.8 GiB for an H200). With a CUDA jax, `--target cuda` compiles
for compile-only GPU topologies of any size (`cuda_topology_devices`) and gives the GPU
compiler's figures on a machine with a single GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from freezeempath_jax import sharding
from freezeempath_jax.models.configs import FreezeEmpathConfig, from_dict
from freezeempath_jax.train import defaults
from freezeempath_jax.train.step import batch_axes, example_batch, make_train_step

GIB = 1024 ** 3

# FSDP over every device as in configs/freezeempath_7b.py (mesh (1, -1, 1)), then two mixes
# at 256: the global batch of 128 cannot be split 256 ways, so data x fsdp must be <= 128 there.
DEFAULT_MESHES = "8:1x8x1,64:1x64x1,256:1x128x2,256:2x64x2"

# Whisper front end: 16 kHz audio, hop 160 -> 100 mel frames per second.
MEL_FRAMES_PER_SECOND = 100


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """A mesh to plan: `devices` devices arranged as (data, fsdp, tensor) = `shape`."""

    devices: int
    shape: Tuple[int, int, int]

    @property
    def name(self) -> str:
        return "x".join(str(s) for s in self.shape)


def parse_meshes(text: str) -> List[MeshSpec]:
    """Parses "8:1x8x1,64:1x-1x1,2x64x2": comma-separated `[N:]DATAxFSDPxTENSOR`.

    With `N:` one size may be -1 (filled so the product is N); without it N is the product.
    """
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        count, _, dims = item.rpartition(":")
        try:
            shape = [int(d) for d in dims.lower().split("x")]
            n = int(count) if count else None
        except ValueError:
            raise ValueError(f"mesh {item!r}: expected [N:]DATAxFSDPxTENSOR, e.g. "
                             "64:1x64x1") from None
        if len(shape) != len(sharding.MESH_AXES):
            raise ValueError(f"mesh {item!r}: give {len(sharding.MESH_AXES)} sizes "
                             f"({'x'.join(sharding.MESH_AXES)})")
        if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
            raise ValueError(f"mesh {item!r}: sizes must be positive (one may be -1)")
        known = math.prod(s for s in shape if s != -1)
        if -1 in shape:
            if n is None or n % known:
                raise ValueError(f"mesh {item!r}: -1 needs a device count N: that the "
                                 "other sizes divide")
            shape[shape.index(-1)] = n // known
        if n is not None and math.prod(shape) != n:
            raise ValueError(f"mesh {item!r}: {'x'.join(map(str, shape))} is "
                             f"{math.prod(shape)} devices, not {n}")
        out.append(MeshSpec(math.prod(shape), tuple(shape)))
    if not out:
        raise ValueError(f"no mesh in {text!r}")
    return out


def load_config(path: str, *, stage: Optional[str] = None, batch_size: Optional[int] = None,
                grad_accum: Optional[int] = None, remat: Optional[str] = None,
                steps: int = 1000):
    """A training config file (configs/*.py) with the plan's overrides, resolved for its stage.

    `steps` only shapes the learning-rate schedule (not memory); it is used when neither the
    file nor the stage's recipe fixes the step count (the 7B recipes count epochs of a
    manifest the plan does not read).
    """
    spec = importlib.util.spec_from_file_location("_plan_config", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load config file {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    with config.unlocked():
        if stage is not None:
            config.stage = defaults.canonical_stage(stage)
        if batch_size is not None:
            config.train.batch_size = int(batch_size)
        if grad_accum is not None:
            config.train.grad_accum = int(grad_accum)
        if remat is not None:
            config.train.remat_policy = remat
        recipe = dict(config.recipes.to_dict().get(defaults.canonical_stage(config.stage), {}))
        if config.train.steps is None and recipe.get("steps") is None:
            config.train.steps = int(steps)
    return defaults.resolve(config)


@dataclasses.dataclass
class MemoryPlan:
    """Per-device bytes of one compiled train step (from `compiled.memory_analysis()`), the
    bytes its shardings predict for the inputs, and the time to lower and compile it."""

    mesh: str
    devices: int
    argument: int = 0
    output: int = 0
    alias: int = 0
    temp: int = 0
    code: int = 0
    xla_peak: int = 0  # XLA's peak_memory_in_bytes: arguments + temp on GPU, ~arguments on CPU
    state: int = 0  # predicted from shardings: trainable params + optimizer state + step/rng
    frozen: int = 0  # predicted: frozen parameters
    batch: int = 0  # predicted: one batch
    trainable_params: int = 0  # global counts
    frozen_params: int = 0
    lower_s: float = 0.0
    compile_s: float = 0.0
    error: str = ""

    @property
    def resident(self) -> int:
        """Input bytes the device holds during the step. jit drops inputs the program never
        reads from its arguments (e.g. the frozen speech decoder in stages 1 and 2), but the
        caller still keeps those arrays on the device, so the sharding prediction counts."""
        return max(self.argument, self.state + self.frozen + self.batch)

    @property
    def total(self) -> int:
        """Estimated bytes one device needs at once: resident inputs, outputs not written in
        place of the donated state, temporaries and the program. Allocator fragmentation and
        the runtime's reserve come on top."""
        return self.resident + self.output - self.alias + self.temp + self.code

    def as_dict(self) -> Dict[str, Any]:
        """Every field plus `resident` and `total` (for JSON)."""
        return dict(dataclasses.asdict(self), resident=self.resident, total=self.total)


def _shard_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` (abstract) under `shardings` (every shard has the same
    shape: the planner's shardings only split dimensions they divide)."""
    def one(x, s):
        return int(np.prod(s.shard_shape(x.shape), dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return int(sum(jax.tree.leaves(jax.tree.map(one, tree, shardings))))


def _count(tree) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def plan_step(config, mesh_spec: MeshSpec, devices: Optional[Sequence[Any]] = None, *,
              prompt_len: int = 16) -> MemoryPlan:
    """Lowers and compiles the train step of a resolved `config` on `mesh_spec` and returns its
    per-device memory. `devices`: the pool to take the mesh's devices from (default: all).

    The batch is `step.example_batch`'s layout: `prompt_len` text tokens either side of the
    speech (and emotion) placeholders, then `data.target_len` reply tokens, with
    `data.audio_seconds` of log-mel frames.
    """
    pool = list(jax.devices() if devices is None else devices)
    if len(pool) < mesh_spec.devices:
        raise ValueError(f"mesh {mesh_spec.name} needs {mesh_spec.devices} devices, have "
                         f"{len(pool)} (set XLA_FLAGS=--xla_force_host_platform_device_count="
                         f"{mesh_spec.devices} before jax is imported)")

    rules = sharding.rules_from_config(config.mesh.rules)
    model_cfg = from_dict(FreezeEmpathConfig, config.model.to_dict())
    tc = defaults.train_config_from(config)
    batch_size, micro = int(tc["batch_size"]), int(tc["microbatches"])
    # Fail with the reason rather than with a partitioner error deep inside lowering.
    axes = batch_axes(rules)
    axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    sizes = dict(zip(sharding.MESH_AXES, mesh_spec.shape))
    shards = math.prod(sizes[a] for a in axes)
    if batch_size % micro or (batch_size // micro) % shards:
        raise ValueError(f"batch {batch_size} in {micro} microbatch(es) does not split over "
                         f"{shards} batch shards ({'*'.join(axes)}) of mesh {mesh_spec.name}")

    mesh = sharding.make_mesh(mesh_spec.shape, devices=pool[:mesh_spec.devices])
    ts = make_train_step(model_cfg, tc, mesh, rules)
    frames = int(round(float(config.data.audio_seconds) * MEL_FRAMES_PER_SECOND))
    batch = example_batch(ts.model_config, ts.train_config.resolved_objective, batch_size,
                          mel_frames=frames, reply_len=int(config.data.target_len),
                          prompt_len=prompt_len, abstract=True)
    out = MemoryPlan(mesh=mesh_spec.name, devices=mesh_spec.devices,
                     state=_shard_bytes(ts.abstract_state, ts.state_shardings),
                     frozen=_shard_bytes(ts.abstract_frozen, ts.frozen_shardings),
                     batch=_shard_bytes(batch, {k: ts.batch_sharding for k in batch}),
                     trainable_params=_count(ts.abstract_state.params),
                     frozen_params=_count(ts.abstract_frozen))
    tic = time.perf_counter()
    lowered = ts.step.lower(ts.abstract_state, ts.abstract_frozen, batch)
    out.lower_s = time.perf_counter() - tic
    tic = time.perf_counter()
    compiled = lowered.compile()
    out.compile_s = time.perf_counter() - tic
    m = compiled.memory_analysis()
    out.argument, out.output = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
    out.alias, out.temp = int(m.alias_size_in_bytes), int(m.temp_size_in_bytes)
    out.code = int(m.generated_code_size_in_bytes)
    out.xla_peak = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    return out


def cuda_topology_devices(n: int, gpus_per_host: int = 8) -> List[Any]:
    """`n` compile-only CUDA devices (`n / gpus_per_host` hosts), for planning GPU meshes with
    the GPU compiler on a machine that has a CUDA jax but not that many GPUs.

    Uses `jax.experimental.topologies` (checked with jax 0.11.2 on one H200: the devices take
    that GPU's kind; nothing is allocated on it).
    """
    from jax.experimental import topologies
    hosts, rest = divmod(n, gpus_per_host)
    if rest or not hosts:
        hosts, gpus_per_host = 1, n  # fewer GPUs than a host holds: one partial host
    return list(topologies.get_topology_desc(
        "plan", "cuda", topology=f"1x{hosts}x{gpus_per_host}").devices)


def plan(config, meshes: Sequence[MeshSpec], devices=None, *, prompt_len: int = 16,
         keep_going: bool = True, log=None) -> List[MemoryPlan]:
    """`plan_step` for each mesh. `devices`: a pool to take every mesh's devices from (default
    `jax.devices()`), or a function MeshSpec -> devices (e.g. compile-only topologies).
    With `keep_going`, a mesh that fails (e.g. a batch that does not split over it) gives a
    row holding the error instead of stopping the others. `log(plan)` is called after each
    mesh (progress for long compiles)."""
    results = []
    for spec in meshes:
        try:
            pool = devices(spec) if callable(devices) else devices
            r = plan_step(config, spec, pool, prompt_len=prompt_len)
        except Exception as e:  # noqa: BLE001 - reported in the table
            if not keep_going:
                raise
            r = MemoryPlan(mesh=spec.name, devices=spec.devices,
                           error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
        results.append(r)
        if log is not None:
            log(r)
        # Each compiled 7B executable and its traced jaxprs hold host memory: drop them.
        jax.clear_caches()
        gc.collect()
    return results


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def markdown_table(results: Sequence[MemoryPlan]) -> str:
    """One row per mesh: GiB per device, times in seconds. "inputs held" is predicted from the
    shardings; the other memory columns are XLA's `memory_analysis()` of the compiled step."""
    rows = ["| devices | mesh (data x fsdp x tensor) | inputs held: frozen / state / batch "
            "| XLA arguments | outputs (aliased) | temp | code | **total** | lower s "
            "| compile s |",
            "|---:|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if r.error:
            rows.append(f"| {r.devices} | {r.mesh} | - | - | - | - | - | - | - | "
                        f"failed: {r.error} |")
            continue
        rows.append(
            f"| {r.devices} | {r.mesh} | {_gib(r.frozen)} / {_gib(r.state)} / "
            f"{_gib(r.batch)} | {_gib(r.argument)} | {_gib(r.output)} ({_gib(r.alias)}) | "
            f"{_gib(r.temp)} | {_gib(r.code)} | **{_gib(r.total)}** | {r.lower_s:.0f} | "
            f"{r.compile_s:.0f} |")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `launch/aot_plan.py`."""
    p = argparse.ArgumentParser(
        prog="aot_plan.py",
        description="AOT-compile the full-size train step for abstract meshes and print "
                    "per-device memory (no parameter memory is allocated).")
    p.add_argument("--config", default="configs/freezeempath_7b.py",
                   help="training config file (default: %(default)s)")
    p.add_argument("--stage", default="1", help="training stage: 1, 2a, 2b, 3a, 3b "
                                                "(default: %(default)s)")
    p.add_argument("--meshes", default=DEFAULT_MESHES,
                   help="comma-separated [N:]DATAxFSDPxTENSOR, one size may be -1 with N: "
                        "(default: %(default)s)")
    p.add_argument("--batch", type=int, default=None,
                   help="global batch (default: the stage's recipe, 128 for stages 1/2)")
    p.add_argument("--grad-accum", type=int, default=None,
                   help="microbatches per step (default: the config's)")
    p.add_argument("--remat", default=None, choices=("none", "full", "dots", "dots_no_batch"),
                   help="remat policy of every block (default: the config's)")
    p.add_argument("--prompt-len", type=int, default=16,
                   help="text tokens either side of the speech placeholders (default: "
                        "%(default)s; the reply length is data.target_len)")
    p.add_argument("--target", default="cpu", choices=("cpu", "cuda"),
                   help="cpu: fake host devices (XLA_FLAGS); cuda: compile-only GPU "
                        "topologies, compiled by the GPU compiler (needs a CUDA jax and one "
                        "local GPU) (default: %(default)s)")
    p.add_argument("--gpus-per-host", type=int, default=8,
                   help="--target cuda: GPUs per host of the planned topology "
                        "(default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parses the flags, plans every mesh (printing each as it finishes) and prints a Markdown
    table. Exit status 1 when any mesh failed."""
    args = build_parser().parse_args(argv)
    meshes = parse_meshes(args.meshes)
    need = max(m.devices for m in meshes)
    devices = None
    if args.target == "cuda":
        def devices(spec):
            return cuda_topology_devices(spec.devices, args.gpus_per_host)
    elif jax.device_count() < need:
        print(f"error: the largest mesh needs {need} devices but jax has "
              f"{jax.device_count()}; run through launch/aot_plan.py, or set XLA_FLAGS="
              f"--xla_force_host_platform_device_count={need} before jax is imported",
              file=sys.stderr)
        return 2
    config = load_config(args.config, stage=args.stage, batch_size=args.batch,
                         grad_accum=args.grad_accum, remat=args.remat)
    t = config.train
    print(f"config {args.config}: stage {config.stage} ({config.loss.objective}), global "
          f"batch {t.batch_size} in {t.grad_accum} microbatch(es), remat "
          f"{t.remat_policy}, frozen {t.frozen_dtype}, compute {t.compute_dtype}, "
          f"{config.data.audio_seconds:g} s audio, reply {config.data.target_len} tokens; "
          f"jax {jax.__version__}, target {args.target} ("
          f"{jax.devices()[0].device_kind}, {jax.device_count()} local devices)", flush=True)

    def log(r: MemoryPlan):
        if r.error:
            print(f"mesh {r.mesh} ({r.devices} devices): {r.error}", flush=True)
        else:
            print(f"mesh {r.mesh} ({r.devices} devices): total {_gib(r.total)} GiB/device "
                  f"(arguments {_gib(r.argument)}, temp {_gib(r.temp)}); params "
                  f"{r.trainable_params:,} trainable / {r.frozen_params:,} frozen; lower "
                  f"{r.lower_s:.0f} s, compile {r.compile_s:.0f} s", flush=True)

    results = plan(config, meshes, devices, prompt_len=args.prompt_len, log=log)
    print()
    print(markdown_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in results], f, indent=1)
    return 1 if any(r.error for r in results) else 0
