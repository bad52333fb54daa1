"""Static shapes for token batches: left padding and bucketed lengths.

jit compiles once per input shape, so every generation call pads its prompts to a bucket
(`round_up`) instead of to the longest row it happens to hold.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np


def round_up(n: int, multiple: int) -> int:
    """`n` rounded up to a multiple of `multiple` (the bucket a length falls into)."""
    return -(-int(n) // int(multiple)) * int(multiple)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, length: Optional[int] = None
             ) -> Tuple[np.ndarray, np.ndarray]:
    """Left-pads a batch: (ids [B, T] int32, attention_mask [B, T] int32 with 1 = real).

    length: pad to this many positions (static shapes); default the longest row.
    """
    longest = max((len(s) for s in sequences), default=0)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"a sequence has {longest} tokens, more than length={length}")
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, length - len(s):] = np.asarray(s, np.int32)
            mask[i, length - len(s):] = 1
    return ids, mask
