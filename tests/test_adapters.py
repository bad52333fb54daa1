"""Speech adapters against small PyTorch references written from DESIGN.md section 2.

Weights are random, copied torch -> flax by the docs/params.md mapping (Linear: kernel =
weight.T; Conv1d: kernel = weight.permute(2, 1, 0)). float32 throughout; max abs error
<= 1e-5 expected.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import linen as nn

from freezeempath_jax.models.adapters import (ConvAdapter, FrameConcatProjector, conv_output_length,
                                              glu, make_projector)
from freezeempath_jax.models.configs import FreezeEmpathConfig, ProjectorConfig, WhisperConfig

TOL = 1e-5


def _lin(layer: torch.nn.Linear):
    return {"kernel": layer.weight.detach().numpy().T, "bias": layer.bias.detach().numpy()}


class TorchFrameConcat(torch.nn.Module):
    """Release projector: drop T mod k, view(B, T/k, k*d), Linear -> ReLU -> Linear."""

    def __init__(self, k, d, hidden, out):
        super().__init__()
        self.k = k
        self.linear1 = torch.nn.Linear(k * d, hidden)
        self.linear2 = torch.nn.Linear(hidden, out)

    def forward(self, x):
        b, t, d = x.shape
        t = t - t % self.k
        x = x[:, :t].contiguous().view(b, t // self.k, d * self.k)
        return self.linear2(F.relu(self.linear1(x)))


class TorchConvAdapter(torch.nn.Module):
    """BLSP-Emo style: Conv1d(k5, s2, p2) -> 2C channels + GLU(dim=channels), then Linear."""

    def __init__(self, d, channels, layers, out):
        super().__init__()
        self.convs = torch.nn.ModuleList(
            torch.nn.Conv1d(d if i == 0 else channels, 2 * channels, 5, stride=2, padding=2)
            for i in range(layers))
        self.proj = torch.nn.Linear(channels, out)

    def forward(self, x):  # [B, T, d]
        h = x.transpose(1, 2)
        for conv in self.convs:
            h = F.glu(conv(h), dim=1)
        return self.proj(h.transpose(1, 2))


@pytest.mark.parametrize("t,k", [(23, 5), (25, 5), (7, 2), (9, 1)])
def test_frame_concat_matches_torch(t, k):
    torch.manual_seed(t * 10 + k)
    d, hidden, out, b = 6, 16, 12, 2
    ref = TorchFrameConcat(k, d, hidden, out).eval()
    x = torch.randn(b, t, d)
    params = {"linear1": _lin(ref.linear1), "linear2": _lin(ref.linear2)}
    model = FrameConcatProjector(ProjectorConfig(type="linear", k=k, hidden_dim=hidden), out)
    y = np.asarray(model.apply({"params": params}, jnp.asarray(x.numpy())))
    with torch.no_grad():
        want = ref(x).numpy()
    assert y.shape == (b, t // k, out)
    assert np.max(np.abs(y - want)) <= TOL


def test_frame_concat_groups_consecutive_frames_in_time_order():
    # With identity-like weights the output token s must be [x_{sk}, x_{sk+1}, ...] flattened.
    k, d, b, t = 3, 2, 1, 8
    x = np.arange(b * t * d, dtype=np.float32).reshape(b, t, d) + 1.0
    eye = np.eye(k * d, dtype=np.float32)
    params = {"linear1": {"kernel": eye, "bias": np.zeros(k * d, np.float32)},
              "linear2": {"kernel": eye, "bias": np.zeros(k * d, np.float32)}}
    model = FrameConcatProjector(ProjectorConfig(k=k, hidden_dim=k * d), k * d)
    y = np.asarray(model.apply({"params": params}, x))
    assert y.shape == (1, 2, k * d)  # frames 6, 7 dropped
    np.testing.assert_array_equal(y[0, 0], x[0, 0:3].reshape(-1))
    np.testing.assert_array_equal(y[0, 1], x[0, 3:6].reshape(-1))


@pytest.mark.parametrize("t,channels,layers", [(40, 8, 3), (37, 0, 3), (16, 4, 1), (11, 6, 2)])
def test_conv_adapter_matches_torch(t, channels, layers):
    torch.manual_seed(t + layers)
    d, out, b = 6, 10, 2
    c = channels or d
    ref = TorchConvAdapter(d, c, layers, out).eval()
    x = torch.randn(b, t, d)
    params = {f"conv_{i}": {"kernel": conv.weight.detach().numpy().transpose(2, 1, 0),
                            "bias": conv.bias.detach().numpy()}
              for i, conv in enumerate(ref.convs)}
    params["proj"] = _lin(ref.proj)
    cfg = ProjectorConfig(type="conv", conv_channels=channels, conv_layers=layers)
    model = ConvAdapter(cfg, out)
    y = np.asarray(model.apply({"params": params}, jnp.asarray(x.numpy())))
    with torch.no_grad():
        want = ref(x).numpy()
    assert y.shape == want.shape == (b, conv_output_length(t, cfg), out)
    assert np.max(np.abs(y - want)) <= TOL


def test_conv_adapter_output_length_full_size():
    # 30 s of Whisper frames: 1500 -> 750 -> 375 -> 188, about 8x fewer.
    cfg = ProjectorConfig(type="conv", conv_channels=4)
    assert conv_output_length(1500, cfg) == 188
    fe = FreezeEmpathConfig(whisper=WhisperConfig(), projector=cfg)
    assert fe.num_speech_tokens == 188
    model = ConvAdapter(cfg, 8)
    shape = jax.eval_shape(lambda: model.init_with_output(
        jax.random.key(0), jnp.zeros((1, 1500, 16)))[0]).shape
    assert shape == (1, 188, 8)


def test_glu_matches_torch():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    np.testing.assert_allclose(np.asarray(glu(jnp.asarray(x.numpy()), axis=-1)),
                               F.glu(x, dim=-1).numpy(), atol=1e-6, rtol=0)
    # The gate is the *second* half: swapping halves must change the result.
    swapped = torch.cat([x[..., 4:], x[..., :4]], dim=-1)
    assert not np.allclose(np.asarray(glu(jnp.asarray(swapped.numpy()))), F.glu(x, dim=-1).numpy())


def _abstract_params(cfg, out=24, frames=30, d=16):
    model = make_projector(cfg, out)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, frames, d))))[
        "params"]


def test_param_tree_and_logical_axes():
    for typ, names in [("linear", {"linear1", "linear2"}),
                       ("conv", {"conv_0", "conv_1", "conv_2", "proj"})]:
        boxed = _abstract_params(ProjectorConfig(type=typ, k=5, hidden_dim=32, conv_channels=8))
        assert set(boxed) == names
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    p = nn.meta.unbox(_abstract_params(ProjectorConfig(k=5, hidden_dim=32)))
    assert p["linear1"]["kernel"].shape == (5 * 16, 32) and p["linear2"]["kernel"].shape == (32, 24)
    p = nn.meta.unbox(_abstract_params(ProjectorConfig(type="conv", conv_channels=8)))
    assert p["conv_0"]["kernel"].shape == (5, 16, 16) and p["conv_1"]["kernel"].shape == (5, 8, 16)
    assert p["proj"]["kernel"].shape == (8, 24)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="type 'qformer' is unknown"):
        make_projector(ProjectorConfig(type="qformer"), 8)
    model = FrameConcatProjector(ProjectorConfig(k=5, hidden_dim=8), 8)
    with pytest.raises(ValueError, match=r"expects \[B, T, d\]"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((30, 16))))
    with pytest.raises(ValueError, match="fewer than k=5"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 3, 16))))
