"""This project's checkpoint format, by name: the files of a converted directory, its
config.json, and detection of which kind of model a directory holds.

    DIR/params/          orbax (OCDBT, sharded arrays; restore onto any mesh)
    DIR/config.json      {"format": "freezeempath-jax", "kind": ..., "config": {...}, ...}
    DIR/tokenizer/       optional, the tokenizer saved with save_pretrained

It imports no loader: every loader asks `converted_kind` whether its input is a converted
directory, so the dependency runs from the loaders to here and never back.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Tuple

from freezeempath_jax.checkpoints.errors import CheckpointError, Problem
from freezeempath_jax.models import configs as C

FORMAT = "freezeempath-jax"
PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
KINDS = {"whisper": C.WhisperConfig, "llm": C.LMConfig, "freezeempath": C.FreezeEmpathConfig,
         "unit_decoder": C.UnitDecoderConfig, "unit_codec": C.UnitCodecConfig}


def save_config(directory: str, config, kind: Optional[str] = None, *,
                subset_regex: Optional[str] = None, extra: Optional[dict] = None) -> str:
    """Writes `directory/config.json` for a config dataclass (kind inferred from its type)."""
    if kind is None:
        kind = next((k for k, cls in KINDS.items() if isinstance(config, cls)), None)
    doc = {"format": FORMAT, "version": 1, "kind": kind,
           "config": C.to_dict(config) if config is not None else None,
           "subset": subset_regex}
    doc.update(extra or {})
    path = os.path.join(directory, CONFIG_FILE)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return path


def load_config(directory: str) -> Tuple[str, Any]:
    """(kind, config dataclass) from `directory/config.json` written by `save_config`."""
    path = os.path.join(os.fspath(directory), CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(directory, [Problem("file", file=path, detail="file not found")])
    with open(path) as f:
        doc = json.load(f)
    if doc.get("format") != FORMAT:
        raise CheckpointError(directory, [Problem("architecture", key="format", file=path,
                                                  expected=FORMAT, actual=doc.get("format"))])
    kind = doc.get("kind")
    if kind not in KINDS:
        raise CheckpointError(directory, [Problem("architecture", key="kind", file=path,
                                                  expected=sorted(KINDS), actual=kind)])
    return kind, C.from_dict(KINDS[kind], doc["config"])


def converted_kind(path) -> Optional[str]:
    """The kind ("whisper", "llm", "freezeempath") of a directory in our format, else None."""
    cfg_path = os.path.join(os.fspath(path), CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        return None
    try:
        with open(cfg_path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc.get("kind") if isinstance(doc, dict) and doc.get("format") == FORMAT else None
