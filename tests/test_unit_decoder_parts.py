"""Each part of the units-to-waveform decoder against IndexTTS2's / MaskGCT's PyTorch code
(random weights, float32): codebook lookup, length regulator, one DiT estimator call, the
CFM sampler. Parameters come through `load_unit_decoder` from a folder in the release's
layout, so the key tables are checked at the same time."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from freezeempath_jax.checkpoints import load_unit_decoder
from freezeempath_jax.models import DiT, LengthRegulator, SemanticCodebook
from freezeempath_jax.models.flow_matching import euler_times, sample
from reference_packages import (SMALL_S2MEL, reference_parts, refs,  # noqa: F401
                                write_release_folder)

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def release(refs, tmp_path_factory):  # noqa: F811
    parts = reference_parts(seed=1)
    folder = tmp_path_factory.mktemp("unit_decoder")
    voice = write_release_folder(folder, parts, prompt_frames=12)
    config, params = load_unit_decoder(folder)
    return parts, voice, config, params


def test_codebook_lookup_matches_vq2emb(release):
    (rc, _, _, _), _, config, params = release
    codes = np.random.default_rng(0).integers(0, config.codec.codebook_size, (2, 23))
    with torch.no_grad():
        want = rc.quantizer.vq2emb(torch.as_tensor(codes)[None]).transpose(1, 2).numpy()
    got = SemanticCodebook(config.codec).apply({"params": params["codec"]}, jnp.asarray(codes))
    err = np.abs(np.asarray(got) - want).max()
    print(f"vq2emb max abs error {err:.2e}")
    assert err <= 1e-5


def test_length_regulator_matches_each_row_alone(release):
    (_, reg, _, _), _, config, params = release
    rng = np.random.default_rng(1)
    in_lens = [37, 50]
    out_lens = [int(np.float32(n) * np.float32(1.72)) for n in in_lens]
    x = rng.standard_normal((2, 50, config.length_regulator.in_channels)).astype(np.float32)
    got = np.asarray(LengthRegulator(config.length_regulator).apply(
        {"params": params["length_regulator"]}, jnp.asarray(x), jnp.asarray(in_lens),
        jnp.asarray(out_lens), max(out_lens)))
    err = 0.0
    for b, (n, m) in enumerate(zip(in_lens, out_lens)):
        with torch.no_grad():
            want = reg(torch.from_numpy(x[b:b + 1, :n]), ylens=torch.LongTensor([m]),
                       n_quantizers=3, f0=None)[0][0].numpy()
        err = max(err, np.abs(got[b, :m] - want).max())
        assert np.all(got[b, m:] == 0)
    print(f"length regulator max abs error {err:.2e}")
    assert err <= 1e-4


def _dit_inputs(config, n, b=2, seed=2):
    rng = np.random.default_rng(seed)
    d = config.dit
    return (rng.standard_normal((b, n, d.in_channels)).astype(np.float32),
            rng.standard_normal((b, n, d.in_channels)).astype(np.float32),
            rng.uniform(0, 1, (b,)).astype(np.float32),
            rng.standard_normal((b, d.style_dim)).astype(np.float32),
            rng.standard_normal((b, n, d.content_dim)).astype(np.float32))


def test_dit_estimator_call_matches_each_row_alone(release):
    (_, _, cfm, _), _, config, params = release
    n, lens = 40, [40, 31]  # the second row padded by 9 frames
    x, prompt, t, style, cond = _dit_inputs(config, n)
    got = np.asarray(DiT(config.dit).apply(
        {"params": params["dit"]}, jnp.asarray(x), jnp.asarray(prompt), jnp.asarray(lens),
        jnp.asarray(t), jnp.asarray(style), jnp.asarray(cond)))
    err = 0.0
    for b, m in enumerate(lens):
        T = lambda a: torch.from_numpy(np.ascontiguousarray(a[b:b + 1, :m].swapaxes(1, 2)))  # noqa
        with torch.no_grad():
            want = cfm.estimator(T(x), T(prompt), torch.LongTensor([m]), torch.from_numpy(t[b:b + 1]),
                                 torch.from_numpy(style[b:b + 1]),
                                 torch.from_numpy(cond[b:b + 1, :m]))[0].numpy().T
        err = max(err, np.abs(got[b, :m] - want).max())
    print(f"DiT estimator max abs error {err:.2e} (output scale {np.abs(got).max():.2f})")
    assert err <= 1e-4


def test_euler_schedule_is_torch_linspace():
    ts, dts = euler_times(25)
    span = torch.linspace(0, 1, 26).numpy()
    np.testing.assert_array_equal(dts, span[1:] - span[:-1])
    assert ts[0] == 0 and abs(ts[-1] + dts[-1] - 1) < 1e-6


def test_cfm_sampler_matches_solve_euler(release):
    (_, _, cfm, _), voice, config, params = release
    p = config.prompt_frames
    n, steps = p + 30, 6
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((1, n, 80)).astype(np.float32)
    mu = rng.standard_normal((1, n, config.dit.content_dim)).astype(np.float32)
    with torch.no_grad():
        want = cfm.solve_euler(torch.from_numpy(noise.swapaxes(1, 2).copy()),
                               torch.LongTensor([n]), voice["ref_mel"],
                               torch.from_numpy(mu), voice["style"], None,
                               torch.linspace(0, 1, steps + 1), inference_cfg_rate=0.7)
    v = params["voice"]
    got = jax.jit(lambda pr: sample(DiT(config.dit), pr, jnp.asarray(noise), v["ref_mel"][None],
                                    jnp.asarray(mu), jnp.asarray([n]), v["style"][None],
                                    steps=steps, cfg_rate=0.7))(params["dit"])
    err = np.abs(np.asarray(got)[0].T - want[0].numpy()).max()
    print(f"CFM ({steps} steps, cfg 0.7) max abs error {err:.2e}")
    assert err <= 1e-4


def test_release_dit_config_shapes():
    """The release's DiT (hidden 512, 13 layers, WaveNet tail) by shape only."""
    from freezeempath_jax.models import DiTConfig

    c = DiTConfig()
    assert (c.hidden_dim, c.depth, c.num_heads, c.intermediate_size) == (512, 13, 8, 1536)
    s = jax.ShapeDtypeStruct
    args = (s((2, 100, 80), jnp.float32), s((2, 100, 80), jnp.float32), s((2,), jnp.int32),
            s((2,), jnp.float32), s((2, 192), jnp.float32), s((2, 100, 512), jnp.float32))
    params = jax.eval_shape(lambda *a: DiT(c).init(jax.random.key(0), *a), *args)
    out = jax.eval_shape(lambda p, *a: DiT(c).apply(p, *a), params, *args)
    assert out.shape == (2, 100, 80)
    assert SMALL_S2MEL["DiT"]["depth"] < c.depth
