"""Safetensors reading, single file or sharded with `model.safetensors.index.json`.

The header is parsed here (8-byte little-endian length, JSON, then raw data) rather than via
`safe_open`: it lets every shard be checked for truncation before any data is read, and each
tensor is read with one positioned file read, so no shard stays memory-mapped and the host
memory of a load is one tensor at a time, not the mapped pages of whole shards.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Tuple

import ml_dtypes
import numpy as np

from freezeempath_jax.checkpoints.errors import CheckpointError, Problem
from freezeempath_jax.checkpoints.sources import TensorSource, check_finite

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


def read_header(path: str) -> Tuple[Dict[str, dict], int, List[Problem]]:
    """(tensor entries, data start offset, problems) of one safetensors file.

    Problems name the file and say whether it is missing, truncated or corrupt; a header
    that is not an object, or an entry whose dtype, shape or data_offsets are malformed,
    negative, of the wrong size or overlapping another's, is corrupt. Only well-formed
    entries are returned.
    """
    if not os.path.isfile(path):
        return {}, 0, [Problem("file", file=path, detail="file not found")]
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return {}, 0, [Problem("truncated", file=path, expected="at least 8 bytes",
                                   actual=f"{size} bytes")]
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            return {}, 0, [Problem("truncated", file=path, expected=f"header of {n} bytes",
                                   actual=f"file of {size} bytes")]
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return {}, 0, [Problem("corrupt", file=path, detail=f"bad JSON header: {e}")]
    if not isinstance(header, dict):
        return {}, 0, [Problem("corrupt", file=path, expected="a JSON object",
                               actual=f"a JSON {type(header).__name__}",
                               detail="safetensors header")]
    header.pop("__metadata__", None)
    header, problems = _valid_entries(header, path)
    # One problem per tensor whose data runs past the end of the file, so the message says
    # which weights a partial download lost (the listing in CheckpointError is capped).
    for key, e in sorted(header.items(), key=lambda kv: int(kv[1]["data_offsets"][0])):
        end = 8 + n + int(e["data_offsets"][1])
        if end > size:
            problems.append(Problem("truncated", key=key, file=path, expected=f"{end} bytes",
                                    actual=f"{size} bytes",
                                    detail=f"{e.get('dtype')} tensor of shape "
                                           f"{tuple(int(d) for d in e.get('shape', ()))}"))
    return header, 8 + n, problems


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _valid_entries(header: dict, path: str) -> Tuple[Dict[str, dict], List[Problem]]:
    """The well-formed tensor entries of a parsed header, and a problem for each other one.

    Checked here, before any data is read: offsets are what each read seeks to, so a
    negative, mis-sized or overlapping range would otherwise read another tensor's bytes
    (or garbage) without a word.
    """
    valid, problems = {}, []
    for key, e in header.items():
        if not isinstance(e, dict):
            problems.append(Problem("corrupt", key=key, file=path, expected="an object",
                                    actual=repr(e)[:80], detail="header entry"))
            continue
        if e.get("dtype") not in _DTYPES:
            problems.append(Problem("dtype", key=key, file=path,
                                    detail=f"unsupported safetensors dtype {e.get('dtype')}"))
            continue
        shape, offsets = e.get("shape"), e.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            problems.append(Problem("corrupt", key=key, file=path, expected="a list of "
                                    "non-negative integers", actual=repr(shape)[:80],
                                    detail="field 'shape'"))
            continue
        if offsets is None:
            problems.append(Problem("corrupt", key=key, file=path,
                                    detail="header entry lacks field 'data_offsets'"))
            continue
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_count(x) for x in offsets) or offsets[0] > offsets[1]):
            problems.append(Problem("corrupt", key=key, file=path,
                                    expected="[begin, end] with 0 <= begin <= end",
                                    actual=repr(offsets)[:80], detail="field 'data_offsets'"))
            continue
        nbytes = math.prod(shape) * np.dtype(_DTYPES[e["dtype"]]).itemsize
        if offsets[1] - offsets[0] != nbytes:
            problems.append(Problem("corrupt", key=key, file=path, expected=f"{nbytes} bytes",
                                    actual=f"{offsets[1] - offsets[0]} bytes",
                                    detail=f"field 'data_offsets' of a {e['dtype']} tensor of "
                                           f"shape {tuple(shape)}"))
            continue
        valid[key] = e
    # Sorted by start, a range overlaps an earlier one exactly when it starts before the
    # furthest end seen so far (empty tensors occupy no bytes and overlap nothing).
    reach = None  # (key, [begin, end]) of the non-empty range reaching furthest
    for key, e in sorted(valid.items(), key=lambda kv: kv[1]["data_offsets"]):
        begin, end = e["data_offsets"]
        if begin == end:
            continue
        if reach is not None and begin < reach[1][1]:
            problems.append(Problem("corrupt", key=key, file=path,
                                    detail=f"field 'data_offsets' {[begin, end]} overlaps "
                                           f"{reach[1]} of {reach[0]!r}"))
        if reach is None or end > reach[1][1]:
            reach = (key, [begin, end])
    return valid, problems


class SafetensorsSource(TensorSource):
    """All tensors of a safetensors checkpoint (a directory, an index file or one file).

    Raises a CheckpointError listing every missing shard, truncated or corrupt file, and every
    key the index promises that its shard lacks.
    """

    def __init__(self, path: str):
        path = os.fspath(path)
        self.origin = path
        if os.path.isdir(path):
            index = os.path.join(path, INDEX_NAME)
            single = os.path.join(path, SINGLE_NAME)
            if os.path.isfile(index):
                files, weight_map = self._from_index(index)
            elif os.path.isfile(single):
                files, weight_map = [single], None
            else:
                found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
                if not found:
                    others = sorted(f for f in os.listdir(path)
                                    if f.endswith((".bin", ".pt", ".pth", ".gguf")))
                    hint = (f"; found {others}: only safetensors is read from a directory "
                            "(re-save with save_pretrained(safe_serialization=True))"
                            if others else "")
                    raise CheckpointError(path, [Problem(
                        "file", file=os.path.join(path, SINGLE_NAME),
                        detail=f"no {INDEX_NAME}, {SINGLE_NAME} or *.safetensors{hint}")])
                files, weight_map = [os.path.join(path, f) for f in found], None
        elif path.endswith(".json"):
            files, weight_map = self._from_index(path)
        else:
            files, weight_map = [path], None

        self._entries: Dict[str, Tuple[str, dict, int]] = {}
        problems: List[Problem] = []
        for fpath in files:
            header, start, probs = read_header(fpath)
            if weight_map is not None and not os.path.isfile(fpath):
                probs = [self._missing_shard(fpath, weight_map)]
            problems += probs
            for key, e in header.items():
                self._entries[key] = (fpath, e, start)
        if weight_map is not None:
            for key, shard in weight_map.items():
                fpath = os.path.join(os.path.dirname(self._index_path), shard)
                if key not in self._entries and os.path.isfile(fpath):
                    problems.append(Problem("missing", key=key, file=fpath,
                                            detail=f"listed in {INDEX_NAME} but absent from "
                                                   "the shard"))
        if problems:
            raise CheckpointError(path, problems)

    def _missing_shard(self, fpath: str, weight_map: Dict[str, str]) -> Problem:
        """A missing shard, named with the keys the index promised in it."""
        base = os.path.dirname(self._index_path)
        listed = sorted(k for k, s in weight_map.items() if os.path.join(base, s) == fpath)
        shown = ", ".join(listed[:8]) + (f" and {len(listed) - 8} more" if len(listed) > 8
                                         else "")
        return Problem("file", file=fpath, detail=f"file not found; {INDEX_NAME} lists "
                                                  f"{len(listed)} tensor(s) in it: {shown}")

    def _from_index(self, index: str):
        self._index_path = index
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(index, [Problem("corrupt", file=index,
                                                  detail=f"unreadable index: {e}")]) from e
        problems = []
        if not isinstance(weight_map, dict):
            problems.append(Problem("corrupt", key="weight_map", file=index,
                                    expected="an object {tensor: shard file}",
                                    actual=f"a JSON {type(weight_map).__name__}"))
            weight_map = {}
        for key, shard in weight_map.items():
            # Lexical check (no realpath): shards in the Hugging Face cache are symlinks into
            # a blobs folder, which is fine; a name that climbs out of the folder is not.
            if (not isinstance(shard, str) or not shard or os.path.isabs(shard)
                    or os.pardir in shard.replace("\\", "/").split("/")):
                problems.append(Problem("corrupt", key="weight_map", file=index,
                                        actual=repr(shard)[:80],
                                        detail=f"the shard of {key!r} must be a file name "
                                               "inside the checkpoint folder"))
        if problems:
            raise CheckpointError(index, problems)
        shards = sorted(set(weight_map.values()))
        return [os.path.join(os.path.dirname(index), s) for s in shards], weight_map

    def keys(self):
        return list(self._entries)

    def __contains__(self, key):
        return key in self._entries

    def shape(self, key):
        return tuple(int(d) for d in self._entries[key][1]["shape"])

    def dtype(self, key):
        return np.dtype(_DTYPES[self._entries[key][1]["dtype"]]).name

    def where(self, key):
        return self._entries[key][0]

    def files(self) -> List[str]:
        """Shard files, in the order a sequential load would visit them."""
        return sorted({v[0] for v in self._entries.values()})

    def read(self, key):
        fpath, e, start = self._entries[key]
        dt = np.dtype(_DTYPES[e["dtype"]])
        begin, end = (int(x) for x in e["data_offsets"])
        shape = tuple(int(d) for d in e["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        if (end - begin) != count * dt.itemsize:
            raise CheckpointError(fpath, [Problem(
                "corrupt", key=key, file=fpath, expected=f"{count * dt.itemsize} bytes",
                actual=f"{end - begin} bytes")])
        with open(fpath, "rb") as f:
            f.seek(start + begin)
            arr = np.empty(count, dt)
            got = f.readinto(memoryview(arr.view(np.uint8)))
        if got != count * dt.itemsize:
            raise CheckpointError(fpath, [Problem("truncated", key=key, file=fpath,
                                                  expected=f"{count * dt.itemsize} bytes",
                                                  actual=f"{got} bytes")])
        return check_finite(arr.reshape(shape), key, fpath)


def read_config(directory: str, name: str = "config.json") -> dict:
    """config.json of a checkpoint directory, or a CheckpointError naming the file."""
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise CheckpointError(directory, [Problem("file", file=path, detail="file not found")])
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(directory, [Problem("corrupt", file=path,
                                                  detail=f"bad JSON: {e}")]) from e


def save_safetensors_sharded(tensors: Dict[str, np.ndarray], directory: str,
                             max_shard_bytes: Optional[int] = None) -> List[str]:
    """Writes numpy tensors as safetensors (with an index when more than one shard).

    Used for tests and to hand our converted weights to other tools; returns the shard paths.
    """
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    shards: List[Dict[str, np.ndarray]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.nbytes
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = np.ascontiguousarray(v)
        size += nbytes
    if len(shards) == 1:
        path = os.path.join(directory, SINGLE_NAME)
        save_file(shards[0], path)
        return [path]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(directory, name))
        weight_map.update({k: name for k in shard})
    with open(os.path.join(directory, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
                   "weight_map": weight_map}, f, indent=1)
    return [os.path.join(directory, n) for n in names]
