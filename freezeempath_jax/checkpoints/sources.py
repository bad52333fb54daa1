"""Uniform read-one-tensor-at-a-time access to the tensors of any checkpoint format.

A source knows every key's shape without reading data, so a whole checkpoint can be
validated (missing / unexpected / mis-shaped keys) before a single weight is read, and then
read tensor by tensor so host memory never holds more than one tensor plus one output leaf.
"""

from __future__ import annotations

from typing import Dict, Iterable, Mapping, Tuple

import ml_dtypes
import numpy as np

from freezeempath_jax.checkpoints.errors import CheckpointError, Problem

# Float types numpy does not class as floats (kind "V"); they can hold NaN too.
_ML_FLOATS = tuple(np.dtype(t) for t in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn,
                                         ml_dtypes.float8_e5m2))


def check_finite(arr: np.ndarray, key: str, file: str) -> np.ndarray:
    """`arr` itself when it holds no NaN or inf; otherwise a CheckpointError naming `key`.

    Every source calls it on each tensor it reads. The test is one float64 sum, which numpy
    computes in buffered blocks (no array-sized temporary; about 1 ns per element, small
    next to reading the bytes): NaN and inf always survive a sum, and float64 cannot
    overflow from summing float32-range weights. Only a failing sum is counted exactly.
    """
    if not (arr.dtype.kind == "f" or arr.dtype in _ML_FLOATS) or arr.size == 0:
        return arr
    if np.isfinite(np.sum(arr, dtype=np.float64)):
        return arr
    bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
    if bad == 0:  # float64 weights summing past 1e308: absurd but finite
        return arr
    first = np.unravel_index(int(np.argmin(np.isfinite(arr))), arr.shape)
    raise CheckpointError(file, [Problem(
        "corrupt", key=key, file=file,
        detail=f"{bad} NaN or infinite value(s) among {arr.size} of shape {arr.shape}, "
               f"first at index {tuple(int(i) for i in first)}")])


class TensorSource:
    """Base class; subclasses implement `keys`, `shape`, `dtype`, `read` and `where`."""

    #: where the tensors live (file or directory), for messages
    origin: str = "<memory>"

    def keys(self) -> Iterable[str]:
        raise NotImplementedError

    def shape(self, key: str) -> Tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> str:
        """A short dtype name ("float16", "int8", "q4_1", ...)."""
        raise NotImplementedError

    def read(self, key: str) -> np.ndarray:
        """The tensor as a numpy array (float tensors keep their stored float dtype)."""
        raise NotImplementedError

    def where(self, key: str) -> str:
        """The file holding `key`."""
        return self.origin

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())


class DictSource(TensorSource):
    """Tensors already in memory (numpy arrays), e.g. a torch state dict converted lazily."""

    def __init__(self, tensors: Mapping[str, object], origin: str = "<memory>",
                 to_numpy=None):
        self._t: Dict[str, object] = dict(tensors)
        self.origin = origin
        self._to_numpy = to_numpy or np.asarray

    def keys(self):
        return list(self._t)

    def __contains__(self, key):
        return key in self._t

    def shape(self, key):
        return tuple(int(d) for d in self._t[key].shape)

    def dtype(self, key):
        return str(self._t[key].dtype).replace("torch.", "")

    def read(self, key):
        return check_finite(self._to_numpy(self._t[key]), key, self.origin)


class PrefixedSource(TensorSource):
    """A view of another source restricted to keys under `prefix`, with the prefix removed."""

    def __init__(self, inner: TensorSource, prefix: str):
        self.inner, self.prefix = inner, prefix
        self.origin = inner.origin
        self._keys = [k[len(prefix):] for k in inner.keys() if k.startswith(prefix)]
        self._set = set(self._keys)

    def keys(self):
        return list(self._keys)

    def __contains__(self, key):
        return key in self._set

    def shape(self, key):
        return self.inner.shape(self.prefix + key)

    def dtype(self, key):
        return self.inner.dtype(self.prefix + key)

    def read(self, key):
        return self.inner.read(self.prefix + key)

    def where(self, key):
        return self.inner.where(self.prefix + key)


def torch_to_numpy(t) -> np.ndarray:
    """torch tensor -> numpy; bfloat16 goes through ml_dtypes (numpy has no bf16)."""
    import torch  # only for formats that are torch pickles

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
