"""One error type for every checkpoint problem, carrying the full list of what is wrong.

Loaders collect problems (missing, unexpected, mis-shaped keys, missing shards, truncated
files) and raise once, so a user fixing a checkpoint sees everything in one go.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Mapping, Optional, Sequence

from freezeempath_jax.models.configs import size_problem


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint.

    kind: "missing" | "unexpected" | "shape" | "dtype" | "file" | "truncated" | "corrupt" |
    "architecture" | "config".
    """

    kind: str
    key: Optional[str] = None
    expected: Optional[object] = None
    actual: Optional[object] = None
    file: Optional[str] = None
    detail: str = ""

    def __str__(self) -> str:
        parts = [self.kind]
        if self.key is not None:
            parts.append(f"key {self.key!r}")
        if self.expected is not None and self.actual is not None:
            parts.append(f"expected {_fmt(self.expected)}, got {_fmt(self.actual)}")
        elif self.expected is not None:
            parts.append(f"expected {_fmt(self.expected)}")
        elif self.actual is not None:
            parts.append(f"found {_fmt(self.actual)}")
        if self.file:
            parts.append(f"in {self.file}")
        text = ": ".join([parts[0], ", ".join(parts[1:])]) if len(parts) > 1 else parts[0]
        return f"{text} ({self.detail})" if self.detail else text


def _fmt(x) -> str:
    if isinstance(x, tuple):
        return "shape " + str(tuple(int(d) for d in x))
    return str(x)


class CheckpointError(ValueError):
    """A checkpoint could not be loaded; `problems` lists every issue found."""

    MAX_LISTED = 40

    def __init__(self, source: str, problems: Sequence[Problem]):
        self.source = str(source)
        self.problems: List[Problem] = list(problems)
        lines = [str(p) for p in self.problems[: self.MAX_LISTED]]
        more = len(self.problems) - len(lines)
        if more > 0:
            lines.append(f"... and {more} more")
        super().__init__(f"cannot load checkpoint {self.source}: {len(self.problems)} problem(s)\n  - "
                         + "\n  - ".join(lines))

    def keys(self, kind: Optional[str] = None) -> List[str]:
        """Keys named by the problems (optionally only one kind)."""
        return [p.key for p in self.problems if p.key is not None and kind in (None, p.kind)]


def fail(source: str, kind: str, detail: str = "", **kw) -> None:
    """Raises a CheckpointError with a single problem."""
    raise CheckpointError(source, [Problem(kind, detail=detail, **kw)])


REQUIRED = object()  # `config_size` default: the field must be present


def config_size(cfg: Mapping[str, Any], key: str, size: str, origin: str,
                problems: List[Problem], default: Any = REQUIRED,
                name: Optional[str] = None) -> Optional[int]:
    """`cfg[key]` as an int checked against the bounds of size `size` (see `SIZE_LIMITS`).

    A missing (without `default`), non-integer or out-of-range value appends one "config"
    problem naming the field (`name`, else `key`) and the file `origin`, and returns None, so
    a caller reports every bad field of a config at once. A missing or null field with a
    `default` gives the default.
    """
    name = key if name is None else name
    value = cfg.get(key) if isinstance(cfg, Mapping) else None
    if value is None:
        if default is not REQUIRED:
            return default
        problems.append(Problem("config", key=name, file=origin,
                                detail="required field is missing"))
        return None
    expected = size_problem(size, value)
    if expected is not None:
        problems.append(Problem("config", key=name, file=origin, expected=expected,
                                actual=repr(value)))
        return None
    return int(value)
