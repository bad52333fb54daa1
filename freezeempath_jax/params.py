"""One regex table over parameter paths drives freezing, optimizer labels, sharding overrides
and checkpoint subsets.

A path is the `/`-joined chain of keys to a leaf (`llm/layers/attn/q_proj/kernel`, see
docs/params.md). A table is an ordered list of `(regex, label)` pairs (config data, so also
accepted as `[regex, label]` lists); a path takes the label of the first regex that matches it
*entirely* (`re.fullmatch`). A path no regex matches is an error naming it: a typo or a new
part of the model never silently falls into the wrong group.

Trees here are the nested dicts Flax produces (plain or frozen); `split` and `merge` keep that
nesting, so the trainable and frozen halves are ordinary parameter trees themselves.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import jax

from freezeempath_jax.tree import _is_boxed, flatten_with_paths, path_str, unflatten  # noqa: F401

TRAINABLE = "trainable"
FROZEN = "frozen"

Table = Sequence[Tuple[str, Any]]

_EVERYTHING_ELSE = "(whisper|projector|emotion|llm|speech_decoder)/.*"

# Default freezing per training stage (DESIGN.md section 5): the named part trains, every
# other part is listed explicitly as frozen so an unknown top-level name raises.
STAGE_TABLES: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "1": (("projector/.*", TRAINABLE), (_EVERYTHING_ELSE, FROZEN)),
    "2a": (("emotion/.*", TRAINABLE), (_EVERYTHING_ELSE, FROZEN)),
    "2b": (("emotion/.*", TRAINABLE), (_EVERYTHING_ELSE, FROZEN)),
    "3a": (("speech_decoder/(input_proj|gate|lm)/.*", TRAINABLE), (_EVERYTHING_ELSE, FROZEN)),
    "3b": (("speech_decoder/(input_proj|gate|lm)/.*", TRAINABLE), (_EVERYTHING_ELSE, FROZEN)),
}

# Leaves that get no weight decay: biases and normalisation scales (scanned layers make these
# 2-D, so the rule is by name, not by rank).
NO_DECAY_REGEX = r"(.*/)?(bias|scale)"


def normalize_table(table: Iterable) -> Tuple[Tuple[str, Any], ...]:
    """Validates a table given as config data ([[regex, label], ...]) and compiles-checks it."""
    out = []
    for i, entry in enumerate(table):
        if isinstance(entry, (str, bytes)) or len(entry) != 2:
            raise ValueError(f"table entry {i} must be a (regex, label) pair, got {entry!r}")
        rx, label = entry
        try:
            re.compile(rx)
        except re.error as e:
            raise ValueError(f"table entry {i}: bad regex {rx!r}: {e}") from e
        out.append((str(rx), label))
    if not out:
        raise ValueError("empty parameter table")
    return tuple(out)


def stage_table(stage: str, table: Optional[Iterable] = None) -> Tuple[Tuple[str, Any], ...]:
    """The table given in config, else the default of `stage` ("1", "2a", "2b", "3a", "3b")."""
    if table is not None:
        return normalize_table(table)
    if str(stage) not in STAGE_TABLES:
        raise ValueError(f"unknown training stage {stage!r}; known stages "
                         f"{sorted(STAGE_TABLES)} (or give a trainable table in config)")
    return STAGE_TABLES[str(stage)]


def match_label(path: str, table: Table, compiled=None):
    """Label of the first regex in `table` matching all of `path`; ValueError when none does."""
    compiled = compiled or [(re.compile(rx), label) for rx, label in table]
    for rx, label in compiled:
        if rx.fullmatch(path):
            return label
    raise ValueError(f"parameter {path!r} matches no entry of the table "
                     f"{[rx for rx, _ in table]}; add a pattern for it")


def label_tree(tree, table: Table):
    """A tree of labels with the structure of `tree` (boxed leaves count as leaves)."""
    table = normalize_table(table)
    compiled = [(re.compile(rx), label) for rx, label in table]
    return jax.tree_util.tree_map_with_path(
        lambda p, _: match_label(path_str(p), table, compiled), tree, is_leaf=_is_boxed)


def _as_dict(tree) -> dict:
    if not isinstance(tree, Mapping):
        raise TypeError(f"expected a nested-dict parameter tree, got {type(tree).__name__}")
    return dict(tree)


def split(tree, labels, keep: str = TRAINABLE):
    """(kept, rest): the leaves whose label is `keep`, and all others, as nested dicts with the
    original nesting (empty branches dropped). `labels` is a tree from `label_tree` or a table.
    """
    if not isinstance(labels, Mapping):
        labels = label_tree(tree, labels)

    def go(t, lab, prefix):
        kept, rest = {}, {}
        t, lab = _as_dict(t), _as_dict(lab)
        if set(t) != set(lab):
            raise ValueError(f"labels and tree disagree under {prefix or '<root>'!r}: "
                             f"{sorted(set(t) ^ set(lab))}")
        for k, v in t.items():
            path = f"{prefix}/{k}" if prefix else str(k)
            if isinstance(v, Mapping):
                a, b = go(v, lab[k], path)
                if a:
                    kept[k] = a
                if b:
                    rest[k] = b
            elif lab[k] == keep:
                kept[k] = v
            else:
                rest[k] = v
        return kept, rest

    return go(tree, labels, "")


def merge(a, b):
    """Union of two nested-dict trees (inverse of `split`); a leaf present in both is an error."""

    def go(x, y, prefix):
        out = dict(_as_dict(x))
        for k, v in _as_dict(y).items():
            path = f"{prefix}/{k}" if prefix else str(k)
            if k not in out:
                out[k] = dict(v) if isinstance(v, Mapping) else v
            elif isinstance(out[k], Mapping) and isinstance(v, Mapping):
                out[k] = go(out[k], v, path)
            else:
                raise ValueError(f"merge: {path!r} is present in both trees")
        return out

    return go(a, b, "")


def subset(tree, regex: str):
    """The leaves whose path fully matches `regex` (nested dict; checkpoint subsets)."""
    rx = re.compile(regex)
    flat = flatten_with_paths(tree)
    return unflatten({p: v for p, v in flat.items() if rx.fullmatch(p)})


def mask_tree(tree, regex: str):
    """Tree of bools: True where the path fully matches `regex`."""
    rx = re.compile(regex)
    return jax.tree_util.tree_map_with_path(
        lambda p, _: bool(rx.fullmatch(path_str(p))), tree, is_leaf=_is_boxed)


def override_shardings(shardings, overrides: Optional[Table], mesh):
    """Replaces the sharding of every leaf whose path matches an override regex.

    `overrides` is a table of (regex, spec) with spec a tuple of mesh-axis names / None per
    dimension (e.g. `("projector/.*", [])` replicates the projector); the first match wins and
    unmatched leaves keep their sharding (here, unlike freezing, "no match" means "no change").
    """
    if not overrides:
        return shardings
    from jax.sharding import NamedSharding, PartitionSpec as P

    table = normalize_table(overrides)
    compiled = [(re.compile(rx), spec) for rx, spec in table]

    def one(path, s):
        p = path_str(path)
        for rx, spec in compiled:
            if rx.fullmatch(p):
                axes = tuple(tuple(a) if isinstance(a, list) else a for a in (spec or ()))
                return NamedSharding(mesh, P(*axes))
        return s

    return jax.tree_util.tree_map_with_path(one, shardings)
