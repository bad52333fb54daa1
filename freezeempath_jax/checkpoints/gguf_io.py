"""GGUF files (llama.cpp): tensors dequantized one at a time, metadata, RoPE helpers.

Tensor shapes in GGUF list the fastest-varying dimension first; the `gguf` package's numpy
views (and `shape` here) use the usual row-major order, so a Linear weight reads as
[out, in] exactly like a torch state dict.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Any, Dict, Optional, Tuple

import numpy as np

from freezeempath_jax.checkpoints.errors import CheckpointError, Problem
from freezeempath_jax.checkpoints.sources import TensorSource, check_finite

SUPPORTED_ARCHS = ("llama", "qwen2")


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Little-endian reader over a bytes-like object; raises _Truncated past the end."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.pos + n > len(self.buf):
            raise _Truncated()
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise _Truncated()
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype in _SCALARS and etype != 7:
                dt = np.dtype(_SCALARS[etype])
                end = self.pos + count * dt.itemsize
                if end > len(self.buf):
                    raise _Truncated()
                arr = np.frombuffer(self.buf, dt, count, self.pos).tolist()
                self.pos = end
                return arr
            return [self.value(etype) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return self.take(_SCALARS[vtype])


class _Truncated(Exception):
    pass


class GGUFSource(TensorSource):
    """Tensors of a GGUF file (versions 2 and 3), parsed here for speed; quantized types are
    dequantized to float32 on read with the `gguf` package.

    `metadata` holds every key/value field (token lists as Python lists).
    """

    dequantizes = True

    def __init__(self, path: str):
        path = os.fspath(path)
        self.origin = path
        if not os.path.isfile(path):
            raise CheckpointError(path, [Problem("file", file=path, detail="file not found")])
        import gguf

        self._gguf = gguf
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        try:
            self._parse(buf, size)
        except _Truncated:
            raise CheckpointError(path, [Problem(
                "truncated", file=path, actual=f"{size} bytes",
                detail="ended inside the GGUF header")]) from None
        except CheckpointError:
            raise  # already names the cut tensors (and is a ValueError: keep it unwrapped)
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(path, [Problem("corrupt", file=path, detail=str(e))]) from None
        finally:
            if isinstance(buf, mmap.mmap):
                buf.close()

    def _parse(self, buf, size):
        c = _Cursor(buf)
        magic = bytes(buf[:4]) if len(buf) >= 4 else b""
        if magic != b"GGUF":
            raise ValueError(f"not a GGUF file (magic {magic!r})")
        c.pos = 4
        version = c.take("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = c.take("<Q"), c.take("<Q")
        self.metadata: Dict[str, Any] = {}
        for _ in range(n_kv):
            key = c.string()
            self.metadata[key] = c.value(c.take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            dims = [c.take("<Q") for _ in range(c.take("<I"))]
            infos.append((name, dims, c.take("<I"), c.take("<Q")))
        align = self.metadata.get("general.alignment", 32)
        # llama.cpp rejects any alignment that is not a power of two; 0 would divide by zero.
        if (isinstance(align, bool) or not isinstance(align, int) or align <= 0
                or align & (align - 1)):
            raise CheckpointError(self.origin, [Problem(
                "corrupt", key="general.alignment", file=self.origin,
                expected="a power of two", actual=repr(align))])
        start = -(-c.pos // align) * align
        self._tensors: Dict[str, Tuple[Tuple[int, ...], Any, int, int]] = {}
        problems = []
        for name, dims, qtype, offset in infos:
            qt = self._gguf.GGMLQuantizationType(qtype)
            block, type_size = self._gguf.GGML_QUANT_SIZES[qt]
            count = int(np.prod(dims, dtype=np.int64))
            nbytes = count // block * type_size
            if start + offset + nbytes > size:
                problems.append(Problem("truncated", key=name, file=self.origin,
                                        expected=f"{start + offset + nbytes} bytes",
                                        actual=f"{size} bytes",
                                        detail=f"{qt.name} tensor of shape "
                                               f"{tuple(int(d) for d in reversed(dims))}"))
            self._tensors[name] = (tuple(int(d) for d in reversed(dims)), qt, start + offset,
                                   nbytes)
        if problems:
            raise CheckpointError(self.origin, problems)

    def keys(self):
        return list(self._tensors)

    def __contains__(self, key):
        return key in self._tensors

    def shape(self, key):
        return self._tensors[key][0]

    def dtype(self, key):
        return self._tensors[key][1].name.lower()

    def read(self, key):
        shape, qt, offset, nbytes = self._tensors[key]
        with open(self.origin, "rb") as f:
            f.seek(offset)
            raw = np.frombuffer(f.read(nbytes), np.uint8)
        return check_finite(self._decode(raw, shape, qt), key, self.origin)

    def _decode(self, raw: np.ndarray, shape, qt) -> np.ndarray:
        qts = self._gguf.GGMLQuantizationType
        if qt == qts.F32:
            return raw.view(np.float32).reshape(shape)
        if qt == qts.F16:
            return raw.view(np.float16).reshape(shape)
        if qt == qts.BF16:
            import ml_dtypes

            return raw.view(ml_dtypes.bfloat16).reshape(shape)
        rows = raw.reshape(int(np.prod(shape[:-1], dtype=np.int64)), -1)
        return np.asarray(self._gguf.quants.dequantize(rows, qt), np.float32).reshape(shape)

    def field(self, name: str, default=None):
        return self.metadata.get(name, default)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation for llama-arch models.

    llama.cpp's converter reorders each head's rows from the half-split RoPE layout used by
    Hugging Face (first half / second half) to interleaved pairs; our RoPE is half-split, so
    the rows are put back: [heads, D/2, 2, ...] -> [heads, 2, D/2, ...].
    """
    rows = w.shape[0]
    d = rows // n_heads
    return np.ascontiguousarray(
        w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's conversion (inverse of `unpermute_qk`), for writing test files."""
    rows = w.shape[0]
    d = rows // n_heads
    return np.ascontiguousarray(
        w.reshape(n_heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def llama3_factor(rope_freqs: np.ndarray, head_dim: int, theta: float,
                  original_max_position: int, low: float = 1.0, high: float = 4.0
                  ) -> Optional[float]:
    """Recovers the llama3 RoPE scaling factor from llama.cpp's `rope_freqs` tensor.

    llama.cpp stores per-frequency divisors instead of the scaling parameters; the largest
    divisor is the factor. Returns it if the divisors match the llama3 rule with the standard
    low/high frequency factors (else None, and the caller reports the file unsupported).
    """
    from freezeempath_jax.models.layers import rope_inv_freq

    factor = float(np.max(rope_freqs))
    base = rope_inv_freq(head_dim, theta)
    scaled = rope_inv_freq(head_dim, theta, "llama3", factor, low, high, original_max_position)
    if np.allclose(base / scaled, rope_freqs, rtol=1e-3):
        return factor
    return None
