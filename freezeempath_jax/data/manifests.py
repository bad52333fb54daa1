"""Speech-instruction corpora from JSONL manifests (InstructS2S-200K style).

One JSON object per line:

    {"id": "q0001", "audio": "wav/q0001.wav", "transcript": "How do I ...?",
     "reply": "You can ...", "units": [812, 812, 45, ...], "emotion": "sad"}

- `id` (string, unique in the file) and `audio` (path; a relative path is taken relative to
  the manifest's folder) are required.
- `transcript`, `reply`: optional strings (stage 1 needs the transcript, whose self-distilled
  reply the `distill` command writes into `reply`).
- `units`: optional speech-unit ids of the reply's speech, for training the speech decoder.
  Format: a list of ints (or one string of whitespace-separated ints) in
  `[0, unit_vocab_size)`, one unit per 20 ms (50 Hz), in time order and not deduplicated,
  as produced by any external unit extractor (the release uses an 8192-code semantic codec;
  k-means over HuBERT features works the same way). The manifest does not say which
  extractor made them: keep one extractor per run and set `unit_vocab_size` to its codebook
  size, which `read_manifest` checks.
- `emotion`: optional, one of `EMOTIONS` (angry, surprised, happy, sad, neutral); `label`
  (its index) is filled in, or checked when given.
Other fields are kept as they are.

`read_manifest(strict=True)` raises `ManifestError` naming the file and line of the first bad
line; with `strict=False` bad lines are skipped into a `SkipReport` instead (what the dataset
builders do, so one bad line never stops a run).
"""

from __future__ import annotations

import json
import os
from typing import Iterable, List, Optional

from freezeempath_jax.data.ser_corpora import SkipReport
from freezeempath_jax.models.configs import EMOTIONS


class ManifestError(ValueError):
    """A manifest line that cannot be used; the message names file and line."""


def _parse_units(value, unit_vocab_size: Optional[int]) -> List[int]:
    if isinstance(value, str):
        try:
            units = [int(t) for t in value.split()]
        except ValueError as e:
            raise ValueError(f"units string holds a non-integer token ({e})") from None
    elif isinstance(value, list):
        if not all(isinstance(u, int) and not isinstance(u, bool) for u in value):
            bad = next(u for u in value if not isinstance(u, int) or isinstance(u, bool))
            raise ValueError(f"units must be integers, found {bad!r}")
        units = list(value)
    else:
        raise ValueError(
            f"units must be a list of ints or a string of ints, got {type(value).__name__}"
        )
    if units:
        low, high = min(units), max(units)
        if low < 0:
            raise ValueError(f"units must be >= 0, found {low}")
        if unit_vocab_size is not None and high >= unit_vocab_size:
            raise ValueError(f"unit {high} is outside [0, unit_vocab_size={unit_vocab_size})")
    return units


def _validate(obj, base_dir: str, unit_vocab_size: Optional[int], check_audio: bool) -> dict:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    for key in ("id", "audio"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise ValueError(f"field {key!r} is required and must be a non-empty string")
    record = dict(obj)
    audio = os.path.expanduser(obj["audio"])
    if not os.path.isabs(audio):
        audio = os.path.normpath(os.path.join(base_dir, audio))
    record["audio"] = audio
    if check_audio and not os.path.isfile(record["audio"]):
        raise FileNotFoundError(f"audio file {record['audio']} does not exist")
    for key in ("transcript", "reply"):
        value = obj.get(key, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
        record[key] = value
    units = obj.get("units")
    record["units"] = None if units is None else _parse_units(units, unit_vocab_size)
    emotion = obj.get("emotion")
    label = obj.get("label")
    if emotion is None or emotion == "":
        record["emotion"] = None
        if label is not None and label != -1:
            raise ValueError(f"field 'label' is {label!r} but no emotion is given")
        record["label"] = -1
    else:
        if emotion not in EMOTIONS:
            raise ValueError(f"emotion {emotion!r} is not one of {EMOTIONS}")
        if label is not None and label != EMOTIONS.index(emotion):
            raise ValueError(
                f"label {label!r} disagrees with emotion {emotion!r} "
                f"(index {EMOTIONS.index(emotion)})"
            )
        record["label"] = EMOTIONS.index(emotion)
    return record


def read_manifest(
    path: str | os.PathLike,
    *,
    unit_vocab_size: Optional[int] = None,
    check_audio: bool = True,
    strict: bool = True,
    report: Optional[SkipReport] = None,
    split: str = "unknown",
) -> List[dict]:
    """Reads and validates a JSONL speech-instruction manifest.

    Args:
      path: the `.jsonl` file.
      unit_vocab_size: when given, every unit must lie in `[0, unit_vocab_size)`.
      check_audio: require every audio file to exist.
      strict: raise `ManifestError` at the first bad line (file and line named); otherwise
        skip bad lines into `report` (reasons: bad_json, bad_record, missing_audio,
        duplicate_id).
      report, split: where skipped lines are counted.

    Returns:
      records with `audio` made absolute, `transcript`/`reply` as strings (possibly empty),
      `units` a list of ints or None, `emotion` a string or None and `label` its index or -1.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ManifestError(f"manifest {path} does not exist")
    report = report if report is not None else SkipReport(os.path.basename(path))
    base_dir = os.path.dirname(os.path.abspath(path))
    records, seen = [], set()

    def bad(reason: str, line_no: int, message: str) -> None:
        where = f"{path}:{line_no}: {message}"
        if strict:
            raise ManifestError(where)
        report.skip(reason, where, split)

    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                bad("bad_json", line_no, f"invalid JSON ({e.msg} at column {e.colno})")
                continue
            try:
                record = _validate(obj, base_dir, unit_vocab_size, check_audio)
            except FileNotFoundError as e:
                bad("missing_audio", line_no, str(e))
                continue
            except ValueError as e:
                bad("bad_record", line_no, str(e))
                continue
            if record["id"] in seen:
                bad("duplicate_id", line_no, f"id {record['id']!r} appears more than once")
                continue
            seen.add(record["id"])
            records.append(record)
    return records


def write_manifest(path: str | os.PathLike, records: Iterable[dict]) -> str:
    """Writes records as JSONL (UTF-8, one object per line); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
