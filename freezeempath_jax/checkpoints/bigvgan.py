"""BigVGAN generator weights: a `bigvgan_generator.pt` (its `generator` entry) or a directory in
the bigvgan package's layout (`config.json` + `bigvgan_generator.pt`).

Weight norm is folded in on load (w = g * v / ||v||, the norm over every axis but the first),
whichever way the file stores it: `weight_g`/`weight_v` (torch.nn.utils.weight_norm),
`parametrizations.weight.original0/1` (the newer parametrization API) or a plain `weight`
(weight norm already removed). The pickles are read with `torch.load(weights_only=True)`,
which refuses to run pickled code.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Dict, List, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from freezeempath_jax.checkpoints.errors import CheckpointError, Problem
from freezeempath_jax.checkpoints.sources import DictSource, TensorSource, torch_to_numpy
from freezeempath_jax.models.configs import BigVGANConfig

GENERATOR_FILE = "bigvgan_generator.pt"


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch Conv1d weight [out, in, k] -> our [k, in, out]."""
    return np.transpose(w, (2, 1, 0))


def conv_transpose_kernel(w: np.ndarray) -> np.ndarray:
    """torch ConvTranspose1d weight [in, out, k] -> our [k, in, out]."""
    return np.transpose(w, (2, 0, 1))


def linear_kernel(w: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> our [in, out]."""
    return np.transpose(w)


class StateReader:
    """Plans reads from a torch state dict, checking every key and shape first.

    `weight()` / `tensor()` record what is wanted and any problem; `finish()` raises one
    CheckpointError listing them all, or reads everything into a nested dict.
    """

    def __init__(self, source: TensorSource, file: str, prefix: str = ""):
        self.src, self.file, self.prefix = source, file, prefix
        self.problems: List[Problem] = []
        self.plan: List[Tuple[str, Callable[[], np.ndarray]]] = []
        self.used = set()

    def _check(self, key: str, shape) -> bool:
        if key not in self.src:
            self.problems.append(Problem("missing", key=self.prefix + key, file=self.file))
            return False
        self.used.add(key)
        got = tuple(self.src.shape(key))
        if shape is not None and got != tuple(shape):
            self.problems.append(Problem("shape", key=self.prefix + key, expected=tuple(shape),
                                        actual=got, file=self.file))
            return False
        return True

    def tensor(self, path: str, key: str, shape, transform=None) -> None:
        """Plans `path` <- `key` (expected torch shape `shape`), through `transform`."""
        if self._check(key, shape):
            read = self.src.read
            self.plan.append((path, lambda: (transform or np.asarray)(
                np.asarray(read(key), np.float32))))

    def weight(self, path: str, module: str, shape, transform=None) -> None:
        """Plans the (weight-normed or plain) `module.weight` of torch shape `shape`."""
        plain, g, v = module + "weight", module + "weight_g", module + "weight_v"
        if plain not in self.src and g not in self.src:
            pg = module + "parametrizations.weight.original0"
            if pg in self.src:
                g, v = pg, module + "parametrizations.weight.original1"
        if plain in self.src or g not in self.src:
            return self.tensor(path, plain, shape, transform)
        g_shape = (shape[0],) + (1,) * (len(shape) - 1) if shape is not None else None
        if self._check(v, shape) & self._check(g, g_shape):
            read = self.src.read

            def fold():
                vv = np.asarray(read(v), np.float32)
                gg = np.asarray(read(g), np.float32)
                norm = np.sqrt(np.sum(vv * vv, axis=tuple(range(1, vv.ndim)), keepdims=True))
                return (transform or np.asarray)(vv * (gg.reshape(norm.shape) / norm))

            self.plan.append((path, fold))

    def unused(self, ignore: Callable[[str], bool] = lambda k: False) -> List[str]:
        return [k for k in self.src.keys() if k not in self.used and not ignore(k)]

    def finish(self, origin: str, dtype=jnp.float32) -> Dict:
        """Raises the collected problems, else reads the plan into a nested param dict."""
        if self.problems:
            raise CheckpointError(origin, self.problems)
        out: Dict = {}
        for path, read in self.plan:
            node = out
            *parents, leaf = path.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = jnp.asarray(read(), dtype)
        return out


def torch_load(path: str, origin: Optional[str] = None):
    """`torch.load(weights_only=True)` (no pickled code runs); failures become one
    CheckpointError naming the file."""
    import torch  # only these pickled formats need torch

    origin = origin or path
    if not os.path.isfile(path):
        raise CheckpointError(origin, [Problem("file", file=path, detail="file not found")])
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupt file here
        raise CheckpointError(origin, [Problem("corrupt", file=path,
                                               detail=f"torch.load failed: {e}")]) from e


def config_from_state(src: TensorSource, base: BigVGANConfig) -> BigVGANConfig:
    """Fills what the tensor shapes say (mels, channels, stages, kernel sizes, final bias,
    activation kind) into `base`; dilations and the log-scale flag keep `base`'s values."""

    def shape(module):
        for k in (module + "weight", module + "weight_v",
                  module + "parametrizations.weight.original1"):
            if k in src:
                return src.shape(k)
        return None

    pre = shape("conv_pre.")
    if pre is None:
        return base
    n_up = 0
    kernels = []
    while shape(f"ups.{n_up}.0.") is not None:
        kernels.append(shape(f"ups.{n_up}.0.")[2])
        n_up += 1
    rk = []
    if n_up:
        n_blocks = 0
        while shape(f"resblocks.{n_blocks}.convs1.0.") is not None:
            n_blocks += 1
        rk = [shape(f"resblocks.{j}.convs1.0.")[2] for j in range(n_blocks // n_up)]
    rates = [k // 2 for k in kernels]  # released v2 models use kernel = 2 * rate
    if len(rates) == len(base.upsample_rates) and all(
            2 * r == k for r, k in zip(base.upsample_rates, kernels)):
        rates = list(base.upsample_rates)
    changes = dict(num_mels=pre[1], upsample_initial_channel=pre[0],
                   use_bias_at_final="conv_post.bias" in src,
                   resblock="1" if shape("resblocks.0.convs2.0.") is not None else "2",
                   activation=("snakebeta" if "activation_post.act.beta" in src else "snake"))
    if n_up:
        changes.update(upsample_rates=tuple(rates), upsample_kernel_sizes=tuple(kernels))
    if rk:
        changes["resblock_kernel_sizes"] = tuple(rk)
        if len(base.resblock_dilation_sizes) != len(rk):
            changes["resblock_dilation_sizes"] = tuple((1, 3, 5) for _ in rk)
    return dataclasses.replace(base, **changes)


def read_bigvgan_state(src: TensorSource, config: BigVGANConfig, file: str,
                       prefix: str = "") -> StateReader:
    """Plans every BigVGAN parameter from a generator state dict (torch names)."""
    c = config
    r = StateReader(src, file, prefix)
    ch0 = c.upsample_initial_channel
    r.weight("conv_pre/kernel", "conv_pre.", (ch0, c.num_mels, 7), conv_kernel)
    r.tensor("conv_pre/bias", "conv_pre.bias", (ch0,))
    n_k = len(c.resblock_kernel_sizes)
    n_convs = 2 if c.resblock == "1" else 1

    def act(path, module, ch):
        r.tensor(path + "/alpha", module + "act.alpha", (ch,))
        if c.activation == "snakebeta":
            r.tensor(path + "/beta", module + "act.beta", (ch,))

    ch = ch0
    for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes)):
        cin, ch = ch, ch0 // 2 ** (i + 1)
        r.weight(f"ups_{i}_kernel", f"ups.{i}.0.", (cin, ch, k), conv_transpose_kernel)
        r.tensor(f"ups_{i}_bias", f"ups.{i}.0.bias", (ch,))
        for j, (rk, rd) in enumerate(zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes)):
            b = i * n_k + j
            for d in range(len(rd)):
                names = ["convs1"] + (["convs2"] if n_convs == 2 else [])
                for name in names:
                    r.weight(f"resblocks_{b}/{name}_{d}/kernel", f"resblocks.{b}.{name}.{d}.",
                             (ch, ch, rk), conv_kernel)
                    r.tensor(f"resblocks_{b}/{name}_{d}/bias", f"resblocks.{b}.{name}.{d}.bias",
                             (ch,))
            for a in range(n_convs * len(rd)):
                act(f"resblocks_{b}/act_{a}", f"resblocks.{b}.activations.{a}.", ch)
    act("act_post", "activation_post.", ch)
    r.weight("conv_post/kernel", "conv_post.", (1, ch, 7), conv_kernel)
    if c.use_bias_at_final:
        r.tensor("conv_post/bias", "conv_post.bias", (1,))
    return r


def _is_buffer(key: str) -> bool:
    # the anti-aliasing FIRs are fixed buffers we recompute from the config
    return key.endswith(".filter")


def load_bigvgan(path, dtype=jnp.float32, *, config: Optional[BigVGANConfig] = None
                 ) -> Tuple[BigVGANConfig, Dict]:
    """`(BigVGANConfig, params)` from a `bigvgan_generator.pt` or a bigvgan directory.

    The directory's `config.json` (bigvgan's hyper-parameter file) sets the config; a bare
    `.pt` gets `config` (default: bigvgan_v2_22khz_80band_256x) with what the tensor shapes
    say filled in. Missing, mis-shaped and unexpected keys are listed in one CheckpointError.
    """
    path = os.fspath(path)
    pt = os.path.join(path, GENERATOR_FILE) if os.path.isdir(path) else path
    base = config or BigVGANConfig()
    hparams = None
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            hparams = json.load(f)
    ckpt = torch_load(pt, path)
    if isinstance(ckpt, dict) and "generator" in ckpt:
        ckpt = ckpt["generator"]
    if not isinstance(ckpt, dict):
        raise CheckpointError(path, [Problem("missing", key="generator", file=pt,
                                             detail="expected a state dict")])
    src = DictSource(ckpt, pt, torch_to_numpy)
    if hparams is not None:
        fields = {f.name for f in dataclasses.fields(BigVGANConfig)}
        cfg = dataclasses.replace(base, **{k: v for k, v in hparams.items() if k in fields})
    else:
        cfg = config_from_state(src, base)
    r = read_bigvgan_state(src, cfg, pt)
    extra = r.unused(_is_buffer)
    if extra:
        r.problems += [Problem("unexpected", key=k, file=pt) for k in extra]
    return cfg, r.finish(path, dtype)
