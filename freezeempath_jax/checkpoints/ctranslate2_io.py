"""The CTranslate2 `model.bin` format, read and written without the ctranslate2 package.

Layout (binary versions 4-6; all integers little-endian):
    uint32 binary_version
    string spec_name, uint32 spec_revision
    uint32 num_variables, then per variable:
        string name, uint8 rank, uint32 dims[rank], uint8 dtype id, uint32 num_bytes, data
    uint32 num_aliases, then per alias: string alias, string target
where a string is a uint16 byte length (including a trailing NUL) then the bytes and NUL.
dtype ids: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16.

Quantized models (int8 / int16 weights with `weight_scale` variables) are not supported for
weights: the loaders say so and name the variable; integer scalars such as
`encoder/num_heads` are read as metadata.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO, Dict, List, Mapping, Optional, Tuple

import ml_dtypes
import numpy as np

from freezeempath_jax.checkpoints.errors import CheckpointError, Problem
from freezeempath_jax.checkpoints.sources import TensorSource, check_finite

MODEL_FILE = "model.bin"
SUPPORTED_VERSIONS = (4, 5, 6)
WRITE_VERSION = 6
_TYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, ml_dtypes.bfloat16)


def _type_id(dtype) -> int:
    dtype = np.dtype(dtype)
    for i, t in enumerate(_TYPES):
        if np.dtype(t) == dtype:
            return i
    raise ValueError(f"CTranslate2 has no type for {dtype}; use one of "
                     f"{[np.dtype(t).name for t in _TYPES]}")


class _Truncated(Exception):
    pass


def _read(f: BinaryIO, fmt: str):
    n = struct.calcsize(fmt)
    b = f.read(n)
    if len(b) != n:
        raise _Truncated()
    return struct.unpack("<" + fmt, b)[0]


def _read_string(f: BinaryIO) -> str:
    n = _read(f, "H")
    b = f.read(n)
    if len(b) != n:
        raise _Truncated()
    return b[:-1].decode("utf-8")


class CTranslate2Source(TensorSource):
    """Variables of a CTranslate2 model file; data is read lazily by offset.

    `spec`, `revision`, `version` hold the header; `aliases` maps alias -> variable name
    (aliases are exposed as keys too).
    """

    def __init__(self, path: str):
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, MODEL_FILE)
        self.origin = path
        if not os.path.isfile(path):
            raise CheckpointError(path, [Problem("file", file=path, detail="file not found")])
        size = os.path.getsize(path)
        self._vars: Dict[str, Tuple[Tuple[int, ...], int, int]] = {}
        self.aliases: Dict[str, str] = {}
        # what was being read, so that a file cut short says where (and which variable)
        name, stage = None, "the header"
        with open(path, "rb") as f:
            try:
                self.version = _read(f, "I")
                if self.version not in SUPPORTED_VERSIONS:
                    raise CheckpointError(path, [Problem(
                        "corrupt", file=path, expected=f"binary version in {SUPPORTED_VERSIONS}",
                        actual=self.version, detail="not a supported CTranslate2 model file")])
                self.spec = _read_string(f)
                self.revision = _read(f, "I")
                n_vars = _read(f, "I")
                for i in range(n_vars):
                    name, stage = None, f"the entry of variable {i + 1} of {n_vars}"
                    name = _read_string(f)
                    rank = _read(f, "B")
                    shape = tuple(_read(f, "I") for _ in range(rank))
                    type_id = _read(f, "B")
                    nbytes = _read(f, "I")
                    if type_id >= len(_TYPES):
                        raise CheckpointError(path, [Problem(
                            "dtype", key=name, file=path, actual=f"type id {type_id}",
                            detail="unknown CTranslate2 data type")])
                    itemsize = np.dtype(_TYPES[type_id]).itemsize
                    if nbytes != itemsize * int(np.prod(shape, dtype=np.int64)):
                        raise CheckpointError(path, [Problem(
                            "corrupt", key=name, file=path, expected=tuple(shape),
                            actual=f"{nbytes} bytes of {np.dtype(_TYPES[type_id]).name}")])
                    offset = f.tell()
                    if offset + nbytes > size:
                        raise CheckpointError(path, [Problem(
                            "truncated", key=name, file=path,
                            expected=f"{offset + nbytes} bytes", actual=f"{size} bytes",
                            detail=f"{np.dtype(_TYPES[type_id]).name} variable of shape "
                                   f"{tuple(shape)}")])
                    f.seek(nbytes, os.SEEK_CUR)
                    self._vars[name] = (shape, type_id, offset)
                name, stage = None, "the alias table"
                for _ in range(_read(f, "I")):
                    alias = _read_string(f)
                    self.aliases[alias] = _read_string(f)
            except _Truncated:
                raise CheckpointError(path, [Problem(
                    "truncated", key=name, file=path, actual=f"{size} bytes",
                    detail=f"ended inside {stage}")]) from None
            except UnicodeDecodeError as e:
                raise CheckpointError(path, [Problem("corrupt", file=path,
                                                     detail=str(e))]) from None

    def _resolve(self, key: str) -> str:
        return self.aliases.get(key, key)

    def keys(self):
        return list(self._vars) + list(self.aliases)

    def __contains__(self, key):
        return key in self._vars or key in self.aliases

    def shape(self, key):
        return self._vars[self._resolve(key)][0]

    def dtype(self, key):
        return np.dtype(_TYPES[self._vars[self._resolve(key)][1]]).name

    def read(self, key):
        shape, type_id, offset = self._vars[self._resolve(key)]
        dt = np.dtype(_TYPES[type_id])
        count = int(np.prod(shape, dtype=np.int64))
        with open(self.origin, "rb") as f:
            f.seek(offset)
            arr = np.frombuffer(f.read(count * dt.itemsize), dt).copy()
        return check_finite(arr.reshape(shape), key, self.origin)


def write_model_bin(path: str, spec: str, revision: int,
                    variables: Mapping[str, np.ndarray],
                    aliases: Optional[Mapping[str, str]] = None) -> None:
    """Writes a CTranslate2 model file (binary version 6) with variables in the given order.

    Scalars keep their numpy dtype (e.g. int16 `num_heads`); float arrays must be float32,
    float16 or bfloat16.
    """
    def string(f, s: str):
        b = s.encode("utf-8")
        f.write(struct.pack("<H", len(b) + 1))
        f.write(b + b"\0")

    with open(path, "wb") as f:
        f.write(struct.pack("<I", WRITE_VERSION))
        string(f, spec)
        f.write(struct.pack("<I", revision))
        f.write(struct.pack("<I", len(variables)))
        for name, value in variables.items():
            value = np.array(value, order="C", copy=True)  # 0-d stays 0-d (ascontiguousarray: 1-d)
            string(f, name)
            f.write(struct.pack("<B", value.ndim))
            for d in value.shape:
                f.write(struct.pack("<I", d))
            f.write(struct.pack("<B", _type_id(value.dtype)))
            f.write(struct.pack("<I", value.nbytes))
            f.write(value.tobytes())
        aliases = dict(aliases or {})
        f.write(struct.pack("<I", len(aliases)))
        for alias, target in aliases.items():
            string(f, alias)
            string(f, target)


def list_variables(path: str) -> List[Tuple[str, Tuple[int, ...], str]]:
    """(name, shape, dtype) of every variable in a model file, for inspection."""
    src = CTranslate2Source(path)
    return [(k, src.shape(k), src.dtype(k)) for k in src._vars]
