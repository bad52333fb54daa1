"""Batch-1 / batch-8 decode speed of the 7B-shaped frozen LLM on one GPU: our jitted
`lax.while_loop` decode vs transformers PyTorch `generate`, against the memory-bandwidth floor
(a script for a lent GPU, not a test).

    python benchmarks/bench_gpu_decode.py --out benchmarks/results/gpu_decode.json  # all of it
    python benchmarks/bench_gpu_decode.py --preset tiny --repeats 1  # a CPU smoke run

One command measures, in one process: our 7B decode at batch 1 and 8 against the bandwidth
floor; transformers `generate` eager and with its static cache + `torch.compile` (the
strongest PyTorch baseline; `--no-torch-compile` skips it); and the time to the first audio
unit of one spoken turn (30 s clip -> Whisper-large-v3 encoder -> prompt -> 7B LLM ->
speech decoder, the FREEZEEMPATH_7B shape, `--no-ttfa` skips it).

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


def torch_rows(cfg, batches, prompt_len, new_tokens, repeats, emit, compiled: bool = False):
    """transformers `generate` rows: eager with its dynamic cache, or (`compiled`) with the
    static cache and `torch.compile` of the forward (mode "reduce-overhead": CUDA graphs)."""
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
    name = f"PyTorch {torch.__version__} generate"
    if compiled:
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        name += " (static cache + torch.compile)"

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
        emit({"framework": name, "batch": b,
              "ms_per_step": step_s * 1e3, "tokens_per_s": b / step_s})


def ttfa_row(repeats, emit, preset: str = "qwen7b"):
    """Time to the first audio unit of one spoken turn (batch 1, 30 s clip, sampled at the
    release settings): log-mel on the device -> encoder, projector, emotion extractor ->
    prompt embeddings -> `stream_speech` until its first round that holds a unit. Random
    weights of the FREEZEEMPATH_7B shape (TINY with `--preset tiny`) in bf16; the first run
    compiles, the best of `repeats` later runs is reported."""
    import jax
    import jax.numpy as jnp

    from freezeempath_jax.checkpoints.model_tree import init_boxed_params
    from freezeempath_jax.inference.plan import with_dtype
    from freezeempath_jax.inference.speech_generation import stream_speech
    from freezeempath_jax.models import presets
    from freezeempath_jax.models.freezeempath import FreezeEmpath, SpeechFeatures
    from freezeempath_jax.tree import cast_floating
    from flax import linen as nn

    cfg = with_dtype(presets.FREEZEEMPATH_7B if preset == "qwen7b" else presets.TINY,
                     "bfloat16")
    params = jax.block_until_ready(jax.jit(lambda k: cast_floating(
        nn.meta.unbox(init_boxed_params(cfg, k)), jnp.bfloat16))(jax.random.key(0)))
    model = FreezeEmpath(cfg)
    frames = 2 * cfg.whisper.max_source_positions
    mel = jnp.asarray(np.random.RandomState(0).randn(1, cfg.whisper.n_mels, frames),
                      jnp.float32)
    s_tok, q_tok = cfg.num_speech_tokens, cfg.emotion.num_queries
    ids = np.concatenate([np.full(16, 3), np.full(s_tok, cfg.speech_token_id),
                          np.full(q_tok, cfg.emotion_token_id), np.full(16, 5)])[None]
    ids = jnp.asarray(ids, jnp.int32)
    encode = jax.jit(lambda p, m: model.apply({"params": p}, m,
                                              method=FreezeEmpath.encode_speech))
    embed = jax.jit(lambda p, i, s, e: model.apply({"params": p}, i, SpeechFeatures(s, e, None),
                                                   method=FreezeEmpath.prompt_embeds))

    def first_unit():
        t = time.perf_counter()
        speech, emotion, _ = encode(params, mel)
        emb = embed(params, ids, speech, emotion)
        rounds = 0
        for _, units in stream_speech(cfg.llm, params["llm"], cfg.speech_decoder,
                                      params["speech_decoder"], emb, max_new_tokens=64,
                                      temperature=0.7, seed=42, max_units=64):
            rounds += 1
            if units[0]:
                break
        return time.perf_counter() - t, rounds

    tic = time.perf_counter()
    first_unit()
    compile_s = time.perf_counter() - tic
    best, rounds = min(first_unit() for _ in range(repeats))
    emit({"framework": "JAX (ours): time to first audio unit, one 30 s spoken turn",
          "batch": 1, "ttfa_ms": best * 1e3, "rounds": rounds, "compile_s": compile_s})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["qwen7b", "tiny"], default="qwen7b")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-torch-compile", action="store_true",
                   help="skip the static-cache + torch.compile baseline")
    p.add_argument("--no-ttfa", action="store_true", help="skip the time to first audio unit")
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
        if not args.no_torch_compile:
            try:
                torch_rows(cfg, batches, args.prompt_len, args.new_tokens, args.repeats, emit,
                           compiled=True)
            except Exception as e:  # keep the other rows: the reason goes into the output
                emit({"framework": "PyTorch static cache + torch.compile", "batch": 0,
                      "error": f"{type(e).__name__}: {e}"[:500]})
    if not args.no_ttfa:
        ttfa_row(args.repeats, emit, args.preset)
    save(rows, meta, args.out)
    print(f"\n{kind}; copy bandwidth {measured / 1e12:.2f} TB/s (datasheet "
          f"{(nominal or 0) / 1e12:.2f}); prompt {args.prompt_len}, {args.new_tokens} new tokens")
    print("| framework | batch | ms / step | tokens/s | floor ms (measured BW) | floor / step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "ms_per_step" not in r:
            continue
        fl = (f"{r['floor_ms']:.2f} | {r['floor_fraction']:.0%}" if "floor_ms" in r
              else "- | -")
        print(f"| {r['framework']} | {r['batch']} | {r['ms_per_step']:.2f} | "
              f"{r['tokens_per_s']:.0f} | {fl} |")
    for r in rows:
        if "ttfa_ms" in r:
            print(f"time to first audio unit: {r['ttfa_ms']:.0f} ms ({r['rounds']} round(s); "
                  f"first run with compilation {r['compile_s']:.0f} s)")
        if "error" in r:
            print(f"{r['framework']}: {r['error']}")


if __name__ == "__main__":
    main()
