"""Decode speed: our jitted `sampling.generate_text` vs transformers PyTorch `generate`, on the
same weights, in one process (a script, not a test; never run in CI).

    python benchmarks/bench_decode.py                  # random Qwen2-0.5B-shaped model
    python benchmarks/bench_decode.py --layers 6       # fewer layers (memory / time)
    python benchmarks/bench_decode.py --smollm2        # + SmolLM2-135M real weights (GGUF)
    python benchmarks/bench_decode.py --preset 25m     # ~25M random Qwen2 (issue 18's figure)

Both sides: greedy, float32, the same prompt ids (B rows of `--prompt-len` random tokens),
exactly `--new-tokens` new tokens (no EOS), warm-up runs excluded, best of `--repeats` interleaved runs.
Decode tokens/s = B * (N - 1) / (t(N new tokens) - t(1 new token)): the prefill and the
first token cancel, leaving the per-step cost of the KV-cache loop. The random model's
weights are made by transformers, saved as safetensors and read by our own loader, so both
frameworks run identical numbers; the greedy tokens of both are compared and the agreement
is printed (float32 summation order can flip a near-tie late in a long random run).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def best_times(fns: dict, repeats: int) -> dict:
    """Best-of-`repeats` seconds of each function, run interleaved so that load from other
    processes on a shared machine hits both sides alike."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(_timed(fn))
    return {k: min(v) for k, v in times.items()}


def bench_pair(name: str, lm_config, params, torch_model, batch: int, prompt_len: int,
               new_tokens: int, repeats: int, seed: int = 0) -> dict:
    """Times both frameworks on one batch size; returns a row of the table."""
    import jax
    import torch

    from freezeempath_jax.inference import sampling

    rng = np.random.RandomState(seed)
    ids = rng.randint(3, lm_config.vocab_size, (batch, prompt_len)).astype(np.int32)
    ids_t = torch.from_numpy(ids.astype(np.int64))
    mask_t = torch.ones_like(ids_t)

    def ours(n):
        out = sampling.generate_text(lm_config, params, ids, max_new_tokens=n)
        return np.asarray(jax.block_until_ready(out))

    def theirs(n):
        with torch.inference_mode():
            out = torch_model.generate(ids_t, attention_mask=mask_t, max_new_tokens=n,
                                       min_new_tokens=n, do_sample=False, num_beams=1,
                                       pad_token_id=0, eos_token_id=None)
        return out[:, prompt_len:].numpy()

    for n in (1, new_tokens):  # warm-up: compilation (ours), allocator / kernels (theirs)
        ours(n)
        theirs(n)
    best = best_times({("ours", 1): lambda: ours(1), ("theirs", 1): lambda: theirs(1),
                       ("ours", new_tokens): lambda: ours(new_tokens),
                       ("theirs", new_tokens): lambda: theirs(new_tokens)}, repeats)
    t_ours = {n: best[("ours", n)] for n in (1, new_tokens)}
    t_theirs = {n: best[("theirs", n)] for n in (1, new_tokens)}
    a, b = ours(new_tokens), theirs(new_tokens)
    agree = next((i for i in range(new_tokens) if (a[:, i] != b[:, i]).any()), new_tokens)
    steps = batch * (new_tokens - 1)
    jax_tps = steps / (t_ours[new_tokens] - t_ours[1])
    torch_tps = steps / (t_theirs[new_tokens] - t_theirs[1])
    return {"model": name, "batch": batch, "jax_tps": jax_tps, "torch_tps": torch_tps,
            "ratio": jax_tps / torch_tps, "agree": agree, "new": new_tokens,
            "jax_prefill_s": t_ours[1], "torch_prefill_s": t_theirs[1]}


# Shapes of the random Qwen2 models (`--preset`); `--layers` overrides the layer count.
PRESETS = {
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                 num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2),
    "25m": dict(vocab_size=32000, hidden_size=384, intermediate_size=1536,
                num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2),
}


def random_qwen2(layers: int, workdir: str, preset: str = "0.5b"):
    """A random Qwen2 transformers model of a `PRESETS` shape and the same weights through our
    loader."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from freezeempath_jax.checkpoints import load_causal_lm

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    shape = dict(PRESETS[preset])
    if layers:
        shape["num_hidden_layers"] = layers
    cfg = Qwen2Config(**shape, max_position_embeddings=32768, rope_theta=1e6,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, torch_dtype="float32")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    path = os.path.join(workdir, "qwen2_random")
    model.save_pretrained(path)
    lm_config, params = load_causal_lm(path)
    return lm_config, params, model


def smollm2():
    """SmolLM2-135M-Instruct from the installed GGUF: our loader and transformers' (both
    dequantize the Q4_1 file to float32). None when the package is absent."""
    from freezeempath_jax import real_models

    try:
        path = real_models.smollm2_gguf()
    except real_models.MissingModelError as e:
        print(f"skipping SmolLM2-135M: {e}", file=sys.stderr)
        return None
    from freezeempath_jax.checkpoints import load_causal_lm

    lm_config, params = load_causal_lm(path)
    model = torch_from_gguf(path)
    model.generation_config.eos_token_id = None
    return lm_config, params, model


def torch_from_gguf(path):
    """transformers' own reading of a GGUF file (its dequantization), assembled by hand:
    `from_pretrained(..., gguf_file=)` runs the same code but also requires `accelerate`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = load_gguf_checkpoint(path)["config"]
    config = AutoConfig.for_model(cfg.pop("model_type"),
                                  **{k: v for k, v in cfg.items() if not k.startswith("_")})
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict({k: torch.as_tensor(np.asarray(v, np.float32))
                           for k, v in tensors.items()}, strict=False)
    model.tie_weights()
    return model.eval()


def machine() -> str:
    import jax
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(x.split(":", 1)[1].strip() for x in f if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{os.cpu_count()}-core {cpu}; jax {jax.__version__} ({jax.devices()[0].platform}),"
            f" torch {torch.__version__} ({torch.get_num_threads()} threads)")


def table(rows) -> str:
    out = ["| model | batch | JAX tok/s | PyTorch tok/s | JAX / PyTorch | greedy tokens equal |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['batch']} | {r['jax_tps']:.1f} | {r['torch_tps']:.1f} "
                   f"| {r['ratio']:.2f} | {r['agree']} / {r['new']} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="0.5b", choices=sorted(PRESETS),
                   help="random Qwen2 shape: 0.5b (Qwen2-0.5B) or 25m (~25M parameters)")
    p.add_argument("--layers", type=int, default=0, help="layer count (default: the preset's)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M real weights")
    p.add_argument("--no-qwen", action="store_true", help="skip the random Qwen2 model")
    args = p.parse_args(argv)

    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_qwen:
            cfg, params, model = random_qwen2(args.layers, tmp, args.preset)
            n_params = sum(p.numel() for p in model.parameters()) / 1e6
            name = (f"Qwen2 {args.preset} shape, random, {cfg.num_layers} layers, "
                    f"{n_params:.0f}M params")
            for b in batches:
                rows.append(bench_pair(name, cfg, params, model, b, args.prompt_len,
                                       args.new_tokens, args.repeats))
                print(table(rows[-1:]), flush=True)
            del params, model
        if args.smollm2:
            got = smollm2()
            if got is not None:
                cfg, params, model = got
                for b in batches:
                    rows.append(bench_pair("SmolLM2-135M-Instruct (GGUF Q4_1 -> f32)", cfg,
                                           params, model, b, args.prompt_len, args.new_tokens,
                                           args.repeats))
                    print(table(rows[-1:]), flush=True)
    print()
    print(f"Machine: {machine()}")
    print(f"Prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, float32, "
          f"best of {args.repeats} interleaved runs.")
    print(table(rows))


if __name__ == "__main__":
    main()
