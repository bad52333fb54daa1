"""Units-to-waveform throughput (waveform seconds per wall second): our jitted decoder vs the
IndexTTS2 / BigVGAN PyTorch reference code, on the same random weights, in one process.

    python benchmarks/bench_unit_decoder.py                   # medium shape, batch 1 and 4
    python benchmarks/bench_unit_decoder.py --units 300 --batches 1 --repeats 2

The reference modules (bigvgan 2.4.1, tts-webui-index-tts 2.0.1) come from the test helper
`tests/reference_packages.py` (installed with --no-deps into a cache directory). They write
a folder in the release's layout that our loader reads, so both sides run identical numbers;
the largest waveform difference (same initial noise) is printed beside the timings. The
reference decodes one utterance at a time, as the release does; ours decodes the batch at once.
25 Euler steps, guidance 0.7, as released. Warm-up (compilation) excluded, best of --repeats.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from bench_decode import best_times, machine  # noqa: E402  (same folder)

# Real depths and layouts (13 DiT layers with U-ViT skips, 8 WaveNet layers, 6 BigVGAN
# stages x 3 AMP blocks, 80 mels, 1024-dim codec features), channels cut to fit 2 CPU cores.
MEDIUM = dict(dit_hidden=256, dit_heads=8, depth=13, wavenet_hidden=256, wavenet_layers=8,
              lr_channels=256, content_dim=256, bigvgan_channels=256)


def build(workdir: str, prompt_frames: int, m=MEDIUM):
    import reference_packages as rp

    rp.install()
    s2 = copy.deepcopy(rp.SMALL_S2MEL)
    s2["DiT"].update(hidden_dim=m["dit_hidden"], num_heads=m["dit_heads"], depth=m["depth"],
                     content_dim=m["content_dim"])
    s2["wavenet"].update(hidden_dim=m["wavenet_hidden"], num_layers=m["wavenet_layers"])
    s2["length_regulator"].update(channels=m["lr_channels"], in_channels=1024)
    s2["style_encoder"]["dim"] = 192
    codec = dict(rp.SMALL_CODEC, codebook_size=8192, hidden_size=1024)
    h = dict(rp.SMALL_BIGVGAN, upsample_initial_channel=m["bigvgan_channels"])
    parts = rp.reference_parts(seed=0, s2mel=s2, codec=codec, bigvgan_h=h)
    voice = rp.write_release_folder(workdir, parts, prompt_frames=prompt_frames, s2mel=s2,
                                    codec=codec)
    return parts, voice


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--units", type=int, default=150, help="units per utterance (50 Hz)")
    ap.add_argument("--prompt-frames", type=int, default=200, help="ref_mel frames of the voice")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    import jax.numpy as jnp
    import torch

    from freezeempath_jax.checkpoints import load_unit_decoder
    from freezeempath_jax.models import decode_units
    from freezeempath_jax.models.unit_decoder import decode_batch_jit, mel_frames

    torch.set_num_threads(os.cpu_count() or 1)
    import reference_packages as rp

    with tempfile.TemporaryDirectory() as d:
        parts, voice = build(d, args.prompt_frames)
        config, params = load_unit_decoder(d)
    rng = np.random.default_rng(0)
    n, p = args.units, args.prompt_frames
    seconds = int(mel_frames(n)) * 256 / 22050

    # equality first: the same noise on both sides
    codes = rng.integers(0, 8192, n)
    noise = rng.standard_normal((1, 80, p + int(mel_frames(n)))).astype(np.float32)
    want = rp.reference_decode(parts, voice, codes, torch.from_numpy(noise))
    got, _ = decode_batch_jit(config, params, jnp.asarray(codes[None]), jnp.asarray([n]),
                              jnp.asarray(noise.swapaxes(1, 2)))
    diff = float(np.abs(np.asarray(got)[0] - want).max())

    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        utts = [rng.integers(0, 8192, n) for _ in range(b)]
        noises = [torch.randn(1, 80, p + int(mel_frames(n))) for _ in range(b)]
        ours = lambda: decode_units(config, params, utts, seed=0, batch_size=b)  # noqa: E731
        ref = lambda: [rp.reference_decode(parts, voice, u, z)  # noqa: E731
                       for u, z in zip(utts, noises)]
        ours()  # compile
        t = best_times({"jax": ours, "torch": ref}, args.repeats)
        rows.append((b, b * seconds / t["jax"], b * seconds / t["torch"]))

    print("| decoder | batch | JAX wave-s/s | PyTorch wave-s/s | JAX / PyTorch | max abs diff |")
    print("|---|---|---|---|---|---|")
    name = (f"DiT {MEDIUM['dit_hidden']}x{MEDIUM['depth']}, WaveNet {MEDIUM['wavenet_hidden']}"
            f"x{MEDIUM['wavenet_layers']}, BigVGAN {MEDIUM['bigvgan_channels']} ch; random")
    for b, j, r in rows:
        print(f"| {name} | {b} | {j:.3f} | {r:.3f} | {j / r:.2f} | {diff:.1e} |")
    print(f"{n} units ({seconds:.2f} s of audio) per utterance, voice prompt {p} frames, "
          f"25 Euler steps with guidance 0.7, float32, best of {args.repeats}.")
    print(f"Machine: {machine()}")


if __name__ == "__main__":
    main()
