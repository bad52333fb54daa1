"""The PyTorch reference code for the units-to-waveform parity tests, kept out of the project.

`bigvgan==2.4.1` (NVIDIA's BigVGAN) and `tts-webui-index-tts==2.0.1` (IndexTTS2's s2mel and
MaskGCT codec code) are installed once with `pip install --no-deps --target` into a cache
directory and put on `sys.path` for the tests only: their own pins (transformers 4.52, numpy<2)
would break this environment, and only a few pure-torch files of each are needed.
Tests skip, saying why, only when pip cannot fetch them (no network).
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

PACKAGES = ("bigvgan==2.4.1", "tts-webui-index-tts==2.0.1")
CACHE = Path(os.environ.get("FREEZEEMPATH_TEST_REFS",
                            Path.home() / ".cache" / "freezeempath-jax-test-refs"))


def _installed(target: Path) -> bool:
    return (target / "bigvgan" / "bigvgan.py").is_file() and (
        target / "indextts" / "s2mel" / "modules" / "flow_matching.py").is_file()


def _stub_incidental_imports() -> None:
    # indextts' commons.py imports munch only for its config helpers (never used by the
    # modules under test), and the MaskGCT vocos.py imports two torchaudio mel helpers at
    # module level for a feature extractor we do not build. Neither is installed here.
    if "munch" not in sys.modules:
        try:
            import munch  # noqa: F401
        except ImportError:
            stub = types.ModuleType("munch")
            stub.Munch = dict
            sys.modules["munch"] = stub
    if "torchaudio" not in sys.modules:
        try:
            import torchaudio  # noqa: F401
        except ImportError:
            ta = types.ModuleType("torchaudio")
            fn = types.ModuleType("torchaudio.functional")
            fnfn = types.ModuleType("torchaudio.functional.functional")
            fnfn._hz_to_mel = fnfn._mel_to_hz = None
            ta.functional, fn.functional = fn, fnfn
            sys.modules.update({"torchaudio": ta, "torchaudio.functional": fn,
                                "torchaudio.functional.functional": fnfn})


def _stub_dac() -> None:
    # length_regulator.py imports the DAC package's VectorQuantize (used only with
    # vector_quantize=True, never in the release); the package's __init__ pulls in
    # descript-audiotools and more. Register empty stand-ins for just that import.
    if "indextts.s2mel.dac.nn.quantize" in sys.modules:
        return
    names = ("indextts.s2mel.dac", "indextts.s2mel.dac.nn", "indextts.s2mel.dac.nn.quantize")
    mods = [types.ModuleType(n) for n in names]
    mods[0].nn, mods[1].quantize = mods[1], mods[2]
    mods[2].VectorQuantize = None
    sys.modules.update(dict(zip(names, mods)))


def install() -> Path:
    """Installs (once) and puts the reference packages on sys.path; skips without network."""
    target = CACHE / "site"
    if not _installed(target):
        target.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
               "--disable-pip-version-check", "--target", str(target), *PACKAGES]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not _installed(target):
            pytest.skip("cannot pip install the reference packages "
                        f"{' '.join(PACKAGES)} (no network?): {proc.stderr.strip()[-300:]}")
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    _stub_incidental_imports()
    _stub_dac()
    return target


@pytest.fixture(scope="session")
def refs():
    """Session fixture: the reference packages' install directory (importable)."""
    return install()


# ---- small reference models of the units-to-waveform decoder (random weights) ----

# Small but real-shaped: 80 mel bands, the release's flags (U-ViT skips, long skip, WaveNet
# tail, style condition), fewer channels / layers so the parity tests run in seconds.
SMALL_S2MEL = {
    "dit_type": "DiT", "reg_loss_type": "l1",
    "style_encoder": {"dim": 16},
    "length_regulator": {"channels": 48, "is_discrete": False, "in_channels": 32,
                         "content_codebook_size": 2048, "sampling_ratios": [1, 1, 1, 1],
                         "vector_quantize": False, "n_codebooks": 1, "quantizer_dropout": 0.0,
                         "f0_condition": False, "n_f0_bins": 512},
    "DiT": {"hidden_dim": 64, "num_heads": 4, "depth": 5, "class_dropout_prob": 0.1,
            "block_size": 8192, "in_channels": 80, "style_condition": True,
            "final_layer_type": "wavenet", "target": "mel", "content_dim": 48,
            "content_codebook_size": 1024, "content_type": "discrete", "f0_condition": False,
            "n_f0_bins": 512, "content_codebooks": 1, "is_causal": False,
            "long_skip_connection": True, "zero_prompt_speech_token": False,
            "time_as_token": False, "style_as_token": False, "uvit_skip_connection": True,
            "add_resblock_in_transformer": False},
    "wavenet": {"hidden_dim": 64, "num_layers": 3, "kernel_size": 5, "dilation_rate": 1,
                "p_dropout": 0.2, "style_condition": True},
}
SMALL_CODEC = {"codebook_size": 64, "hidden_size": 32, "codebook_dim": 8, "vocos_dim": 16,
               "vocos_intermediate_dim": 32, "vocos_num_layers": 1}
SMALL_BIGVGAN = dict(resblock="1", upsample_rates=[4, 4, 2, 2, 2, 2],
                     upsample_kernel_sizes=[8, 8, 4, 4, 4, 4], upsample_initial_channel=64,
                     resblock_kernel_sizes=[3, 7, 11], resblock_dilation_sizes=[[1, 3, 5]] * 3,
                     use_tanh_at_final=False, use_bias_at_final=False, activation="snakebeta",
                     snake_logscale=True, num_mels=80, sampling_rate=22050)


def _ns(d):
    from types import SimpleNamespace

    return SimpleNamespace(**{k: _ns(v) if isinstance(v, dict) else v for k, v in d.items()})


def _perturb(module, seed):
    """Moves every parameter off its initial value (ones, zeros, tiny inits), so each one
    matters to the output."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith((".alpha", ".beta")):
                p.copy_(0.3 * noise)
            elif torch.all(p == 1):
                p.copy_(1 + 0.1 * noise)
            elif torch.all(p == 0):
                p.copy_(0.05 * noise)
            else:
                scale = p.std().clamp(min=1e-3) if p.numel() > 1 else p.abs().max()
                p.add_(0.1 * scale * noise)
    return module.eval()


def reference_parts(seed=0, s2mel=None, codec=None, bigvgan_h=None):
    """(RepCodec, InterpolateRegulator, CFM, BigVGAN) torch modules with random weights."""
    import torch
    from bigvgan.bigvgan import BigVGAN
    from bigvgan.env import AttrDict
    from indextts.s2mel.modules.flow_matching import CFM
    from indextts.s2mel.modules.length_regulator import InterpolateRegulator
    from indextts.utils.maskgct.models.codec.kmeans.repcodec_model import RepCodec

    s2 = s2mel or SMALL_S2MEL
    torch.manual_seed(seed)
    rc = RepCodec(**(codec or SMALL_CODEC))
    lr = s2["length_regulator"]
    reg = InterpolateRegulator(channels=lr["channels"], sampling_ratios=lr["sampling_ratios"],
                               is_discrete=False, in_channels=lr["in_channels"],
                               codebook_size=lr["content_codebook_size"])
    cfm = CFM(_ns(s2))
    cfm.estimator.setup_caches(max_batch_size=4, max_seq_length=1024)
    voc = BigVGAN(AttrDict(dict(bigvgan_h or SMALL_BIGVGAN)), use_cuda_kernel=False)
    return tuple(_perturb(m, seed + i) for i, m in enumerate((rc, reg, cfm, voc)))


def write_release_folder(folder, parts, prompt_frames=12, seed=0, s2mel=None, codec=None):
    """Writes the release's decoder folder layout from reference modules; returns the voice
    tensors (style [1, S], prompt_condition [1, P, D], ref_mel [1, 80, P])."""
    from pathlib import Path

    import torch
    import yaml
    from safetensors.torch import save_file

    rc, reg, cfm, voc = parts
    s2 = s2mel or SMALL_S2MEL
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(
        {"semantic_codec": codec or SMALL_CODEC, "s2mel": s2}))
    save_file({k: v.contiguous() for k, v in rc.state_dict().items()},
              str(folder / "semantic_codec.safetensors"))
    torch.save({"net": {"cfm": cfm.state_dict(), "length_regulator": reg.state_dict()}},
               folder / "s2mel.pth")
    torch.save({"generator": voc.state_dict()}, folder / "bigvgan_generator.pt")
    g = torch.Generator().manual_seed(seed + 100)
    voice = {"style": torch.randn(1, s2["style_encoder"]["dim"], generator=g),
             "prompt_condition": torch.randn(1, prompt_frames, s2["DiT"]["content_dim"],
                                             generator=g),
             "ref_mel": torch.randn(1, 80, prompt_frames, generator=g) - 5.0}
    for name, t in voice.items():
        torch.save(t, folder / f"{name}.pt")
    return voice


def reference_decode(parts, voice, codes, noise, steps=25, cfg_rate=0.7):
    """The release's per-chunk flow in torch for one row: codes [T] -> waveform [N], with the
    CFM's initial noise given ([1, 80, P + M]) instead of drawn."""
    import torch

    rc, reg, cfm, voc = parts
    with torch.no_grad():
        codes = torch.as_tensor(codes, dtype=torch.long)[None]
        s = rc.quantizer.vq2emb(codes[None]).transpose(1, 2)  # [1, T, hidden]
        ylens = (torch.LongTensor([codes.shape[-1]]) * 1.72).long()
        cond = reg(s, ylens=ylens, n_quantizers=3, f0=None)[0]
        cat = torch.cat([voice["prompt_condition"], cond], dim=1)
        t_span = torch.linspace(0, 1, steps + 1)
        mel = cfm.solve_euler(noise.clone(), torch.LongTensor([cat.size(1)]), voice["ref_mel"],
                              cat, voice["style"], None, t_span, inference_cfg_rate=cfg_rate)
        mel = mel[:, :, voice["ref_mel"].size(-1):]
        return torch.clamp(voc(mel.float()), -1.0, 1.0)[0, 0].numpy()
