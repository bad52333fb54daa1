"""Units -> waveform end to end: the release's folder layout (written from the PyTorch
reference modules with random weights) loads, decodes equal to the reference flow with the
same initial noise, batches and buckets without changing a row, streams, converts to our
format, and a broken folder fails naming the file or tensor."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from freezeempath_jax.checkpoints import CheckpointError, convert, load_unit_decoder
from freezeempath_jax.models import decode_units, stream_units
from freezeempath_jax.models.unit_decoder import decode_batch_jit, mel_frames
from reference_packages import (reference_decode, reference_parts, refs,  # noqa: F401
                                write_release_folder)

torch = pytest.importorskip("torch")

P = 10  # prompt frames of the test voice


@pytest.fixture(scope="module")
def release(refs, tmp_path_factory):  # noqa: F811
    parts = reference_parts(seed=5)
    folder = tmp_path_factory.mktemp("unit_decoder_release")
    voice = write_release_folder(folder, parts, prompt_frames=P)
    config, params = load_unit_decoder(folder)
    return folder, parts, voice, config, params


def test_units_to_waveform_matches_reference_with_same_noise(release):
    _, parts, voice, config, params = release
    n = 64  # one bucket exactly: the vocoder sees no padding
    codes = np.random.default_rng(0).integers(0, config.codec.codebook_size, n)
    m = int(mel_frames(n))
    noise = np.random.default_rng(1).standard_normal((1, 80, P + m)).astype(np.float32)
    want = reference_decode(parts, voice, codes, torch.from_numpy(noise))
    wav, valid = decode_batch_jit(config, params, jnp.asarray(codes[None]), jnp.asarray([n]),
                                  jnp.asarray(noise.swapaxes(1, 2)))
    got = np.asarray(wav)[0, :int(valid[0])]
    assert got.shape == want.shape == (m * 256,)
    err = np.abs(got - want).max()
    print(f"units -> waveform max abs error {err:.2e} (peak {np.abs(want).max():.3f})")
    assert np.abs(want).max() > 0.01
    assert err <= 1e-3


def test_batched_bucketed_chunked_and_streamed_decoding(release):
    import dataclasses

    _, _, _, config, params = release
    # fewer Euler steps: batching, padding and chunking do not depend on the step count
    config = dataclasses.replace(config, diffusion_steps=4)
    rng = np.random.default_rng(2)
    k = config.codec.codebook_size
    a, b = rng.integers(0, k, 50), rng.integers(0, k, 64)
    alone = decode_units(config, params, [a], seed=3)[0]
    both = decode_units(config, params, [a, b], seed=3)
    assert len(alone) == int(mel_frames(50)) * 256 and len(both[1]) == int(mel_frames(64)) * 256
    # the padded row is the same CFM mel; only the vocoder's last frames see the padding
    np.testing.assert_allclose(both[0], alone, atol=1e-5)
    # a row padded from 50 to the 64 bucket vs the same row decoded at its own length
    exact, valid = decode_batch_jit(config, params, jnp.asarray(a[None]), jnp.asarray([50]),
                                    _noise(config, params, 50, seed=3))
    exact = np.asarray(exact)[0, :int(valid[0])]
    # only the vocoder's deeper layers see the padding: the last frames move a little
    err = np.abs(both[0] - exact).reshape(-1, 256).max(axis=1)
    print(f"bucketed vs exact-length: up to 10 frames before the end {err[:-10].max():.1e}, "
          f"last 10 frames but one {err[-10:-1].max():.1e}, last frame {err[-1]:.1e}")
    assert err[:-10].max() <= 1e-4 and err[-10:-1].max() <= 1e-2

    # chunks of at most max_chunk_units joined by 200 ms of silence, and streaming
    small = dataclasses.replace(config, max_chunk_units=32)
    long = rng.integers(0, k, 70)  # 32 + 32 + 6 units
    joined = decode_units(small, params, long, seed=4)[0]
    gap = int(round(0.2 * 22050))
    lens = [int(mel_frames(n)) * 256 for n in (32, 32, 6)]
    assert len(joined) == sum(lens) + 2 * gap
    assert np.all(joined[lens[0]:lens[0] + gap] == 0)
    pieces = list(stream_units(small, params, long, seed=4, silence_seconds=0.2))
    assert [len(p) for p in pieces] == [lens[0], gap, lens[1], gap, lens[2]]
    np.testing.assert_allclose(np.concatenate(pieces), joined, atol=1e-6)
    assert decode_units(config, params, [np.zeros(0, int)])[0].shape == (0,)


def _noise(config, params, n_units, seed):
    """The noise decode_units draws for utterance 0, chunk 0 (frame-keyed)."""
    from freezeempath_jax.models.unit_decoder import _chunk_key, frame_noise

    m = int(mel_frames(n_units))
    return frame_noise(_chunk_key(seed, 0, 0), P + m, 80)[None]


def test_missing_file_and_misshaped_tensor_are_named(release, tmp_path):
    folder, parts, _, _, _ = release
    broken = tmp_path / "missing"
    shutil.copytree(folder, broken)
    (broken / "s2mel.pth").unlink()
    with pytest.raises(CheckpointError) as e:
        load_unit_decoder(broken)
    assert "s2mel.pth" in str(e.value) and len(e.value.problems) == 1

    bad = tmp_path / "shape"
    shutil.copytree(folder, bad)
    net = torch.load(bad / "s2mel.pth", weights_only=True)
    key = "estimator.transformer.layers.2.attention.wqkv.weight"
    net["net"]["cfm"][key] = net["net"]["cfm"][key][:, :-1].clone()
    torch.save(net, bad / "s2mel.pth")
    torch.save(torch.zeros(1, 7), bad / "style.pt")
    with pytest.raises(CheckpointError) as e:
        load_unit_decoder(bad)
    msg = str(e.value)
    assert "cfm.estimator.transformer.layers.2.attention.wqkv.weight" in msg
    assert any(p.key == "style" and p.actual == (7,) for p in e.value.problems)
    assert {p.kind for p in e.value.problems} == {"shape"}


def test_convert_unit_decoder_round_trips(release, tmp_path):
    folder, _, _, config, params = release
    out = convert("unit_decoder", str(folder), str(tmp_path / "conv"))
    config2, params2 = load_unit_decoder(out)
    assert config2 == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_release_config_defaults_and_full_size_shapes():
    """Our defaults are the release's values; the full decoder traces (shapes only)."""
    from freezeempath_jax.models import UnitDecoderConfig
    from freezeempath_jax.models.unit_decoder import decode_batch, init_params

    c = UnitDecoderConfig(prompt_frames=300)
    assert (c.diffusion_steps, c.cfg_rate, c.frames_per_unit, c.max_chunk_units) == (
        25, 0.7, 1.72, 1500)
    assert (c.length_regulator.channels, c.length_regulator.in_channels) == (512, 1024)
    assert (c.codec.codebook_size, c.codec.hidden_size) == (8192, 1024)
    params = jax.eval_shape(lambda: init_params(c, jax.random.key(0)))
    t = 128
    out, _ = jax.eval_shape(
        lambda p, x, n, z: decode_batch(c, p, x, n, z), params,
        jax.ShapeDtypeStruct((2, t), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32),
        jax.ShapeDtypeStruct((2, 300 + int(mel_frames(t)), 80), jnp.float32))
    assert out.shape == (2, int(mel_frames(t)) * 256)
