"""Whisper encoder throughput: our jitted `WhisperEncoder` vs transformers PyTorch, on the same
random weights, 30 s clips (mel [B, n_mels, 3000]), in one process (a script, not a test).

    python benchmarks/bench_encoder.py                        # tiny.en and small shapes
    python benchmarks/bench_encoder.py --sizes tiny.en --batches 1,4

The weights are made by transformers (`WhisperModel`, random), saved as safetensors and read
by our loader, so both frameworks run identical numbers; the largest difference of the final
hidden states is printed beside the timings. Warm-up excluded, best of `--repeats` interleaved runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import best_times, machine  # noqa: E402  (same folder)

# name: (d_model, layers, heads, n_mels)
SIZES = {
    "tiny.en": (384, 4, 6, 80),
    "base": (512, 6, 8, 80),
    "small": (768, 12, 12, 80),
    "medium": (1024, 24, 16, 80),
    "large-v3": (1280, 32, 20, 128),
}


def bench_size(name: str, batches, repeats: int, workdir: str):
    import jax
    import jax.numpy as jnp
    import torch
    from transformers import WhisperConfig as HFWhisperConfig
    from transformers import WhisperModel

    from freezeempath_jax.checkpoints import load_whisper_encoder
    from freezeempath_jax.models.whisper import WhisperEncoder

    d, layers, heads, mels = SIZES[name]
    hf_cfg = HFWhisperConfig(d_model=d, encoder_layers=layers, encoder_attention_heads=heads,
                             encoder_ffn_dim=4 * d, decoder_layers=1, decoder_attention_heads=heads,
                             decoder_ffn_dim=4 * d, num_mel_bins=mels, vocab_size=64,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2,
                             decoder_start_token_id=1)
    torch.manual_seed(0)
    model = WhisperModel(hf_cfg).eval()
    path = os.path.join(workdir, f"whisper_{name}")
    model.save_pretrained(path)
    encoder = model.get_encoder()
    cfg, params = load_whisper_encoder(path)
    fwd = jax.jit(lambda p, mel: WhisperEncoder(cfg).apply({"params": p}, mel).last_hidden_state)

    rows = []
    for b in batches:
        mel = np.random.RandomState(b).randn(b, mels, 3000).astype(np.float32)
        mel_j, mel_t = jnp.asarray(mel), torch.from_numpy(mel)

        def ours():
            return np.asarray(jax.block_until_ready(fwd(params, mel_j)))

        def theirs():
            with torch.inference_mode():
                return encoder(mel_t).last_hidden_state.numpy()

        err = float(np.abs(ours() - theirs()).max())  # also the warm-up
        best = best_times({"ours": ours, "theirs": theirs}, repeats)
        t_ours, t_theirs = best["ours"], best["theirs"]
        rows.append({"model": f"Whisper {name} shape (d {d}, {layers} layers)", "batch": b,
                     "jax": b / t_ours, "torch": b / t_theirs, "ratio": t_theirs / t_ours,
                     "err": err})
        print(table(rows[-1:]), flush=True)
    return rows


def table(rows) -> str:
    out = ["| encoder | batch | JAX clips/s | PyTorch clips/s | JAX / PyTorch | max abs diff |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['batch']} | {r['jax']:.2f} | {r['torch']:.2f} | "
                   f"{r['ratio']:.2f} | {r['err']:.1e} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny.en,small", help=f"from {sorted(SIZES)}")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    import torch
    torch.set_num_threads(os.cpu_count() or 1)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sizes.split(","):
            rows += bench_size(name, [int(b) for b in args.batches.split(",")], args.repeats,
                               tmp)
    print()
    print(f"Machine: {machine()}")
    print(f"30 s clips (3000 mel frames), float32, best of {args.repeats} interleaved runs.")
    print(table(rows))


if __name__ == "__main__":
    main()
