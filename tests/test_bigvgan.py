"""BigVGAN v2 in JAX against NVIDIA's `bigvgan` package (random weights, a real mel), and the
loader for `bigvgan_generator.pt` files and bigvgan directories."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from freezeempath_jax.checkpoints import CheckpointError, load_bigvgan
from freezeempath_jax.models import BigVGAN, BigVGANConfig
from reference_packages import refs  # noqa: F401  (session fixture)

torch = pytest.importorskip("torch")

SHARED_AUDIO = Path(__file__).resolve().parents[2] / "shared" / "audio"

# Real 256x strides and kernel shapes, fewer channels (128 -> 2) so the test is fast.
SMALL = dict(resblock="1", upsample_rates=[4, 4, 2, 2, 2, 2],
             upsample_kernel_sizes=[8, 8, 4, 4, 4, 4], upsample_initial_channel=128,
             resblock_kernel_sizes=[3, 7, 11], resblock_dilation_sizes=[[1, 3, 5]] * 3,
             use_tanh_at_final=False, use_bias_at_final=False, activation="snakebeta",
             snake_logscale=True, num_mels=80, n_fft=1024, hop_size=256, win_size=1024,
             sampling_rate=22050, fmin=0, fmax=None)


def reference_generator(h: dict, seed=0):
    """The bigvgan package's generator with random weights (weight norm still applied)."""
    from bigvgan.bigvgan import BigVGAN as TorchBigVGAN
    from bigvgan.env import AttrDict

    torch.manual_seed(seed)
    model = TorchBigVGAN(AttrDict(dict(h)), use_cuda_kernel=False).eval()
    with torch.no_grad():  # away from init so every parameter matters
        for name, p in model.named_parameters():
            if name.endswith((".alpha", ".beta")):
                p.copy_(0.3 * torch.randn_like(p))
            elif name.endswith("weight_g"):
                p.mul_(1.0 + 0.2 * torch.rand_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


def real_mel(seconds=0.5):
    """An 80-band BigVGAN mel [1, 80, T] of real speech from ../shared/audio."""
    from bigvgan.meldataset import mel_spectrogram

    from freezeempath_jax.audio import load_audio

    wavs = sorted(SHARED_AUDIO.glob("*.wav"))
    if not wavs:
        pytest.skip(f"no shared speech samples in {SHARED_AUDIO}")
    x = load_audio(wavs[0], sampling_rate=22050)
    start = len(x) // 4  # inside the utterance, not leading silence
    x = torch.from_numpy(x[start:start + int(seconds * 22050)].copy())[None]
    return mel_spectrogram(x, 1024, 80, 22050, 256, 1024, 0, None)


@pytest.fixture(scope="module")
def saved(refs, tmp_path_factory):  # noqa: F811
    model = reference_generator(SMALL)
    d = tmp_path_factory.mktemp("bigvgan")
    torch.save({"generator": model.state_dict()}, d / "bigvgan_generator.pt")
    (d / "config.json").write_text(json.dumps(SMALL))
    return model, d


def test_bigvgan_matches_reference_on_real_mel(saved):
    model, d = saved
    config, params = load_bigvgan(d)
    mel = real_mel()
    with torch.no_grad():
        want = model(mel)[:, 0].numpy()
    got = np.asarray(jax.jit(BigVGAN(config).apply)({"params": params}, jnp.asarray(mel.numpy())))
    assert got.shape == (1, mel.shape[-1] * 256) == want.shape
    err = np.abs(got - want).max()
    print(f"BigVGAN max abs error {err:.2e} (peak {np.abs(want).max():.3f})")
    assert np.abs(want).max() > 0.05  # a real signal, not a near-zero output
    assert err <= 1e-4


def test_bare_pt_infers_config_and_weight_norm_removed_state_loads(saved, tmp_path):
    model, d = saved
    cfg_dir, p_dir = load_bigvgan(d)
    cfg_pt, p_pt = load_bigvgan(d / "bigvgan_generator.pt")  # shapes -> config
    assert cfg_pt == cfg_dir
    import copy

    folded = copy.deepcopy(model)
    folded.remove_weight_norm()
    torch.save({"generator": folded.state_dict()}, tmp_path / "g.pt")
    _, p_folded = load_bigvgan(tmp_path / "g.pt")
    for a, b in zip(jax.tree.leaves(p_pt), jax.tree.leaves(p_folded)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_missing_and_misshaped_generator_keys_are_named(saved, tmp_path):
    model, _ = saved
    sd = dict(model.state_dict())
    del sd["resblocks.4.activations.2.act.beta"]
    sd["conv_pre.bias"] = torch.zeros(7)
    torch.save({"generator": sd}, tmp_path / "bad.pt")
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    with pytest.raises(CheckpointError) as e:
        load_bigvgan(tmp_path / "bad.pt", config=BigVGANConfig(upsample_initial_channel=128))
    msg = str(e.value)
    assert "resblocks.4.activations.2.act.beta" in msg and "conv_pre.bias" in msg
    assert set(e.value.keys("missing")) == {"resblocks.4.activations.2.act.beta"}


def test_full_size_config_shapes():
    """The released 22 kHz 80-band 256x generator, by shape only (no compute)."""
    c = BigVGANConfig()
    mel = jax.ShapeDtypeStruct((2, 80, 10), jnp.float32)
    params = jax.eval_shape(lambda m: BigVGAN(c).init(jax.random.key(0), m), mel)
    out = jax.eval_shape(lambda p, m: BigVGAN(c).apply(p, m), params, mel)
    assert out.shape == (2, 2560) and c.hop_length == 256
    n = sum(np.prod(x.shape) for x in jax.tree.leaves(params))
    assert 110e6 < n < 115e6  # the released generator has about 112 M parameters
