"""Peak host memory of `load_causal_lm` on a large Hugging Face-format checkpoint (a script,
not a test).

    python benchmarks/peak_memory_load.py                    # Qwen2.5-1.5B shape, bf16
    python benchmarks/peak_memory_load.py --shape 3b --shard-gb 2
    python benchmarks/peak_memory_load.py --dir /big/disk/ckpt --keep

1. Writes a random Qwen2-family model of the chosen shape in bf16 as sharded safetensors
   (with `model.safetensors.index.json`), shard by shard with the safetensors numpy API, so
   writing holds at most one shard in memory, never the whole model.
2. In a fresh Python process (nothing inherited from the writer), imports jax and the package,
   records the resident set size (RSS), then runs `load_causal_lm(path, dtype=bfloat16)`
   while a thread samples `/proc/self/status` (VmRSS, VmHWM) every 5 ms; afterwards reads
   `resource.getrusage(...).ru_maxrss` (the kernel's peak RSS).
3. Prints the checkpoint size, largest shard, largest output leaf, the returned parameters'
   size and the peak, and deletes the files (unless --keep).

What to expect: the loader returns host (CPU device) arrays, so the result itself must be
resident at the end: the floor for the peak is baseline + result. On top of that the loader
holds one stacked output leaf (`[layers, ...]`, built layer by layer) plus the tensor being
read, and while that leaf is handed to jax both the host staging array and jax's copy exist
(jax on CPU copies numpy input; `may_alias` / `donate` do not avoid it). So the goal is
peak ~= baseline + result + at most one stacked leaf; a peak near baseline + 2 x result
would mean every tensor is held twice.

Measured (2 shared CPU cores, jax 0.10.2, after placing leaves largest first and waiting for
each transfer, see `checkpoints/assemble.py`): Qwen2.5-3B shape, 5.75 GiB in 3 shards of up
to 1.97 GiB, largest stacked leaf 1.51 GiB: peak 6.81 GiB with 0.18 GiB baseline, i.e.
result + 0.88 GiB (0.58 x the largest leaf). Before those two changes: result + 1.52 GiB,
and RSS stayed at the peak after the load because jax released the last staging array only
at a later transfer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

# Qwen2.5 shapes (config.json of the public models): vocab, hidden, intermediate, layers,
# heads, kv heads, tied embeddings
SHAPES = {
    "0.5b": (151936, 896, 4864, 24, 14, 2, True),
    "1.5b": (151936, 1536, 8960, 28, 12, 2, True),
    "3b": (151936, 2048, 11008, 36, 16, 2, True),
    "7b": (152064, 3584, 18944, 28, 28, 4, False),
}
GIB = 1024 ** 3


def tensor_shapes(shape: str):
    """(name, shape) of every tensor of a Hugging Face Qwen2ForCausalLM, in save order."""
    vocab, h, f, layers, heads, kv, tied = SHAPES[shape]
    d = h // heads
    out = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (heads * d, h)),
                (p + "self_attn.q_proj.bias", (heads * d,)),
                (p + "self_attn.k_proj.weight", (kv * d, h)),
                (p + "self_attn.k_proj.bias", (kv * d,)),
                (p + "self_attn.v_proj.weight", (kv * d, h)),
                (p + "self_attn.v_proj.bias", (kv * d,)),
                (p + "self_attn.o_proj.weight", (h, heads * d)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (f, h)),
                (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f))]
    out.append(("model.norm.weight", (h,)))
    if not tied:
        out.append(("lm_head.weight", (vocab, h)))
    return out


def hf_config(shape: str) -> dict:
    """config.json of the shape, as transformers writes it for Qwen2."""
    vocab, h, f, layers, heads, kv, tied = SHAPES[shape]
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": vocab,
            "hidden_size": h, "intermediate_size": f, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
            "tie_word_embeddings": tied, "use_sliding_window": False, "hidden_act": "silu",
            "torch_dtype": "bfloat16"}


def write_checkpoint(directory: str, shape: str, shard_bytes: int, seed: int = 0) -> dict:
    """Writes the random bf16 checkpoint shard by shard; returns sizes for the report."""
    import ml_dtypes
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    # Values are slices of one random pool: generating 3e9 normals would take minutes, and the
    # numbers' distribution is irrelevant to memory use.
    pool = (np.random.default_rng(seed).standard_normal(1 << 24, dtype=np.float32) * 0.02
            ).astype(ml_dtypes.bfloat16)

    def make(shape_):
        n = int(np.prod(shape_))
        reps = -(-n // pool.size)
        return np.tile(pool, reps)[:n].reshape(shape_) if reps > 1 else pool[:n].reshape(shape_)

    plan, current, size = [], [], 0
    for name, shp in tensor_shapes(shape):
        nbytes = int(np.prod(shp)) * 2
        if current and size + nbytes > shard_bytes:
            plan.append(current)
            current, size = [], 0
        current.append((name, shp))
        size += nbytes
    plan.append(current)
    names = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    weight_map, shard_sizes = {}, []
    for fname, entries in zip(names, plan):
        tensors = {name: make(shp) for name, shp in entries}  # one shard in memory at a time
        save_file(tensors, os.path.join(directory, fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name, _ in entries})
        shard_sizes.append(os.path.getsize(os.path.join(directory, fname)))
        del tensors
    total = sum(int(np.prod(s)) * 2 for _, s in tensor_shapes(shape))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config(shape), f, indent=1)
    return {"files_bytes": sum(shard_sizes), "largest_shard_bytes": max(shard_sizes),
            "shards": len(shard_sizes), "tensor_bytes": total}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure(directory: str) -> dict:
    """Runs in the fresh process: the load under a 5 ms RSS sampler. Sizes in bytes."""
    import jax
    import jax.numpy as jnp

    from freezeempath_jax.checkpoints import load_causal_lm

    jax.devices()  # start the backend first: its memory belongs to the baseline
    baseline = _status_kb("VmRSS") * 1024
    samples, stop = [], threading.Event()

    def sample():
        t0 = time.perf_counter()
        while not stop.is_set():
            samples.append((time.perf_counter() - t0, _status_kb("VmRSS") * 1024))
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t = time.perf_counter()
    cfg, params = load_causal_lm(directory, dtype=jnp.bfloat16)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t
    stop.set()
    th.join()
    leaves = jax.tree.leaves(params)
    return {"baseline_rss": baseline,
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB
            "vm_hwm": _status_kb("VmHWM") * 1024,
            "sampled_peak": max(r for _, r in samples),
            "final_rss": _status_kb("VmRSS") * 1024,
            "result_bytes": sum(x.nbytes for x in leaves),
            "largest_leaf_bytes": max(x.nbytes for x in leaves),
            "leaves": len(leaves), "seconds": seconds,
            "platform": leaves[0].devices().pop().platform}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1.5b")
    p.add_argument("--shard-gb", type=float, default=1.0, help="max shard size (GiB)")
    p.add_argument("--dir", default=None, help="checkpoint directory (default: a new folder "
                                               "under $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint files")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.measure:
        print("RESULT" + json.dumps(measure(args.measure)))
        return 0

    import tempfile

    directory = args.dir or tempfile.mkdtemp(prefix=f"peak_mem_{args.shape}_")
    need = sum(int(np.prod(s)) * 2 for _, s in tensor_shapes(args.shape))
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(directory))).free
    if need * 1.05 > free:
        print(f"not enough disk: need {need / GIB:.1f} GiB, have {free / GIB:.1f} GiB")
        return 1
    try:
        t = time.perf_counter()
        sizes = write_checkpoint(directory, args.shape, int(args.shard_gb * GIB))
        write_s = time.perf_counter() - t
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure",
                               directory], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-6000:])
            return 1
        m = json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1][6:])
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)

    g = lambda b: f"{b / GIB:7.2f} GiB"  # noqa: E731
    peak = m["ru_maxrss"]
    over = peak - m["baseline_rss"]
    rows = [
        ("shape", f"Qwen2.5-{args.shape} (random, bf16), {sizes['shards']} shards"),
        ("checkpoint on disk", g(sizes["files_bytes"])),
        ("largest shard", g(sizes["largest_shard_bytes"])),
        ("largest stacked leaf", g(m["largest_leaf_bytes"])),
        ("returned params (resident)", g(m["result_bytes"]) + f" on {m['platform']}"),
        ("RSS before load (jax up)", g(m["baseline_rss"])),
        ("peak RSS, ru_maxrss", g(peak)),
        ("peak RSS, VmHWM", g(m["vm_hwm"])),
        ("peak RSS, 5 ms samples", g(m["sampled_peak"])),
        ("RSS after load", g(m["final_rss"])),
        ("peak - baseline", g(over) + f"  = {over / m['result_bytes']:.2f} x params"),
        ("peak - baseline - params", g(over - m["result_bytes"]) +
         f"  = {(over - m['result_bytes']) / m['largest_leaf_bytes']:.2f} x largest leaf, "
         f"{(over - m['result_bytes']) / sizes['largest_shard_bytes']:.2f} x largest shard"),
        ("load time", f"{m['seconds']:.1f} s (write {write_s:.1f} s)"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("RESULT" + json.dumps(dict(sizes, **m, shape=args.shape, write_seconds=write_s)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
