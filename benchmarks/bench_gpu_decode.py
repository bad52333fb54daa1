"""Batch-1 / batch-8 decode speed of the 7B-shaped frozen LLM on one GPU: our jitted
`lax.while_loop` decode vs transformers PyTorch `generate`, against the memory-bandwidth floor
(a script for a lent GPU, not a test).

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 python benchmarks/bench_gpu_decode.py --out result.json
    python benchmarks/bench_gpu_decode.py --preset tiny --no-torch   # a CPU smoke run

Both sides: random weights of the Qwen2.5-7B-Instruct shape in bf16 (the weights' values do
not change the speed; identical numbers across frameworks are checked on CPU by
bench_decode.py), greedy, `--prompt-len` prompt tokens, exactly `--new-tokens` new tokens.
Ours: the prefill and the decode loop are separate jitted calls; the decode call alone is
timed, so ms/token = t(decode) / (N - 1). PyTorch: t(N new) - t(1 new) over N - 1 tokens (the
prefill cancels), best of `--repeats`. The floor of one decode step is the bytes it must read
(every weight once + the KV cache) over the memory bandwidth, both the datasheet figure and a
device-to-device copy measured in the same run. Rows are printed as they are measured and
written to `--out` after each one, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np

# Leave GPU memory for PyTorch in the same process (JAX would preallocate 75%).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

DATASHEET_BW = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def save(rows, meta, path):
    if path:
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


def copy_bandwidth(gib: float = 4.0) -> float:
    """Bytes/s of a device-to-device copy-with-add (bytes read + written), median of 10."""
    import jax
    import jax.numpy as jnp

    n = int(gib * 2**30) // 2
    x = jnp.ones((n,), jnp.bfloat16)
    f = jax.jit(lambda a: a + 1)
    jax.block_until_ready(f(x))
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        jax.block_until_ready(f(x))
        ts.append(time.perf_counter() - t)
    del x
    return 2 * n * 2 / float(np.median(ts))


def jax_rows(cfg, batches, prompt_len, new_tokens, repeats, floor_bw, emit):
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from freezeempath_jax.inference import sampling
    from freezeempath_jax.models import CausalLM, init_cache

    init = jax.jit(lambda k: nn.meta.unbox(CausalLM(cfg).init(
        k, input_ids=jnp.zeros((1, 1), jnp.int32))["params"]))
    params = jax.block_until_ready(init(jax.random.key(0)))
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    sc = sampling.make_sampling(0.0)
    mode, rules = sampling.mode_of(sc), sampling.rules_of(sc)
    for b in batches:
        ids = jnp.asarray(np.random.RandomState(b).randint(3, cfg.vocab_size, (b, prompt_len)),
                          jnp.int32)
        mask = jnp.ones((b, prompt_len), jnp.int32)

        def prefill():
            cache = init_cache(cfg, b, prompt_len + new_tokens - 1)
            return jax.block_until_ready(sampling._prefill_jit(
                cfg, params, ids, None, mask, cache, jax.random.key(0), rules,
                max_new_tokens=new_tokens, mode=mode, keep_hidden=False))

        def decode(state):
            t = time.perf_counter()
            out = jax.block_until_ready(sampling._decode_jit(cfg, params, state,
                                                             jnp.int32(new_tokens), mode=mode))
            return time.perf_counter() - t, out

        tic = time.perf_counter()
        decode(prefill())  # compiles both
        compile_s = time.perf_counter() - tic
        best = min(decode(prefill())[0] for _ in range(repeats))
        step_s = best / (new_tokens - 1)
        kv_bytes = (2 * cfg.num_layers * b * (prompt_len + new_tokens) * cfg.num_kv_heads
                    * cfg.head_dim * 2)
        floor_s = (weight_bytes + kv_bytes / 2) / floor_bw  # mean cache fill: half of the end
        emit({"framework": "JAX (ours)", "batch": b, "ms_per_step": step_s * 1e3,
              "tokens_per_s": b / step_s, "floor_ms": floor_s * 1e3,
              "floor_fraction": floor_s / step_s, "compile_s": compile_s,
              "weight_gb": weight_bytes / 1e9})


def torch_rows(cfg, batches, prompt_len, new_tokens, repeats, emit):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hf = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                     intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                     num_key_value_heads=cfg.num_kv_heads, rope_theta=cfg.rope_theta,
                     rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_embeddings,
                     max_position_embeddings=cfg.max_position_embeddings)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        model = Qwen2ForCausalLM(hf).eval()
    torch.set_default_dtype(torch.float32)
    model.generation_config.eos_token_id = None

    def gen(ids, n):
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, num_beams=1, pad_token_id=0)
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for b in batches:
        ids = torch.from_numpy(np.random.RandomState(b).randint(
            3, cfg.vocab_size, (b, prompt_len))).to(dev)
        gen(ids, 2)
        gen(ids, new_tokens)  # warm-up: allocator, kernels
        t1 = min(gen(ids, 1) for _ in range(repeats))
        tn = min(gen(ids, new_tokens) for _ in range(repeats))
        step_s = (tn - t1) / (new_tokens - 1)
        emit({"framework": f"PyTorch {torch.__version__} generate", "batch": b,
              "ms_per_step": step_s * 1e3, "tokens_per_s": b / step_s})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["qwen7b", "tiny"], default="qwen7b")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--out", default=None, help="JSON file written after every row")
    args = p.parse_args(argv)

    import jax

    from freezeempath_jax.models import presets
    base = presets.QWEN25_7B_INSTRUCT if args.preset == "qwen7b" else presets.TINY.llm
    cfg = dataclasses.replace(base, dtype="bfloat16", param_dtype="bfloat16")
    kind = jax.devices()[0].device_kind
    nominal = next((bw for k, bw in DATASHEET_BW.items() if k in kind), None)
    measured = copy_bandwidth(4.0 if jax.devices()[0].platform == "gpu" else 0.25)
    meta = {"device": kind, "jax": jax.__version__, "copy_bandwidth_tb_s": measured / 1e12,
            "datasheet_bandwidth_tb_s": (nominal or 0) / 1e12, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "preset": args.preset}
    print(json.dumps(meta), flush=True)
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        save(rows, meta, args.out)

    batches = [int(b) for b in args.batches.split(",")]
    jax_rows(cfg, batches, args.prompt_len, args.new_tokens, args.repeats, measured, emit)
    if nominal:
        for r in rows:
            r["floor_ms_datasheet"] = r["floor_ms"] * measured / nominal
    if not args.no_torch:
        torch_rows(cfg, batches, args.prompt_len, args.new_tokens, args.repeats, emit)
    save(rows, meta, args.out)
    print(f"\n{kind}; copy bandwidth {measured / 1e12:.2f} TB/s (datasheet "
          f"{(nominal or 0) / 1e12:.2f}); prompt {args.prompt_len}, {args.new_tokens} new tokens")
    print("| framework | batch | ms / step | tokens/s | floor ms (measured BW) | floor / step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        fl = (f"{r['floor_ms']:.2f} | {r['floor_fraction']:.0%}" if "floor_ms" in r
              else "- | -")
        print(f"| {r['framework']} | {r['batch']} | {r['ms_per_step']:.2f} | "
              f"{r['tokens_per_s']:.0f} | {fl} |")


if __name__ == "__main__":
    main()
