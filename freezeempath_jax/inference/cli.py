"""`freezeempath-jax chat`: answers a manifest of spoken questions into a JSONL file.

Nothing one input line holds can end the run: a line that is not UTF-8, not JSON, not a JSON
object, names no audio, repeats an earlier id, or whose audio cannot be read or answered gets
an error record and the rest are answered. Problems with the command itself (a missing input,
an output that cannot be written, or the input as the output) are a `ChatUsageError` raised
before the model loads.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from typing import Dict, List, Optional

import jax
import numpy as np
import soundfile as sf
from tqdm import tqdm

from freezeempath_jax.audio import load_audio
from freezeempath_jax.checkpoints.unit_decoder import load_unit_decoder
from freezeempath_jax.inference.chat import MAX_SECONDS, ChatModel
from freezeempath_jax.inference.loading import load_chat_model
from freezeempath_jax.inference.voice import Voice

log = logging.getLogger(__name__)


class ChatUsageError(ValueError):
    """The chat command cannot run as asked (input or output path); one line, raised before
    the model loads."""


def _reject_constant(name: str):
    # json.loads accepts NaN / Infinity by default; such a record could never be echoed back
    # as strict JSON, so it is refused like any other malformed line.
    raise ValueError(f"non-finite number {name} is not JSON")


def _line_error(input_path: str, n: int, msg: str) -> dict:
    return {"id": f"line{n}", "audio": None, "error": f"{input_path}:{n}: {msg}"}


def _id_key(qid) -> str:
    # ids may be any JSON value (the release uses ints and strings); compare them as JSON
    return json.dumps(qid, sort_keys=True)


def read_items(input_path: str) -> List[dict]:
    """Items `{"id", "audio"}` of a JSONL manifest (release format; `question_id` and
    `speech` are accepted as aliases; relative audio paths resolve against the manifest's
    folder when they do not exist as given) or of a single audio file.

    A line that cannot be used becomes an item with an `error` ("<file>:<line>: ..."):
    bytes that are not UTF-8, text that is not JSON (NaN / Infinity included), JSON that is
    not an object, no audio path, or an id an earlier line already used (only the first is
    answered; a warning names both lines). A missing or unreadable input file is a
    `ChatUsageError`.
    """
    if not os.path.exists(input_path):
        raise ChatUsageError(f"--input {input_path!r} does not exist")
    if os.path.isdir(input_path):
        raise ChatUsageError(f"--input {input_path!r} is a directory, not an audio file or a "
                             "JSONL manifest")
    if not input_path.endswith((".jsonl", ".json")):
        return [{"id": os.path.splitext(os.path.basename(input_path))[0], "audio": input_path}]
    base = os.path.dirname(os.path.abspath(input_path))
    try:
        with open(input_path, "rb") as f:  # bytes: one undecodable line must not end the read
            raw_lines = f.read().splitlines()
    except OSError as e:
        raise ChatUsageError(f"--input {input_path!r} cannot be read: {e.strerror or e}") from e
    items, first_line = [], {}
    for n, raw in enumerate(raw_lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            items.append(_line_error(input_path, n, f"not UTF-8 text (byte {e.start})"))
            continue
        if not line.strip():
            continue
        try:
            rec = json.loads(line, parse_constant=_reject_constant)
        except ValueError as e:  # JSONDecodeError is a ValueError
            items.append(_line_error(input_path, n, f"not JSON ({e})"))
            continue
        if not isinstance(rec, dict):
            kind = "null" if rec is None else type(rec).__name__
            items.append(_line_error(input_path, n, f"expected a JSON object "
                                     f'{{"id": ..., "audio": ...}}, got {kind}'))
            continue
        qid = rec.get("id", rec.get("question_id", f"line{n}"))
        audio = rec.get("audio", rec.get("speech"))
        item = {"id": qid, "audio": audio}
        key = _id_key(qid)
        if key in first_line:
            msg = (f"{input_path}:{n}: duplicate id {qid!r}, first used on line "
                   f"{first_line[key]} (answered there only)")
            log.warning("%s", msg)
            item["error"] = msg
        elif not isinstance(audio, str) or not audio:
            item["error"] = f"{input_path}:{n}: no 'audio' path in the record"
        elif not os.path.isabs(audio) and not os.path.exists(audio):
            item["audio"] = os.path.join(base, audio)
            item["shown_audio"] = audio
        first_line.setdefault(key, n)
        items.append(item)
    return items


def check_output(output_path: str, input_path: Optional[str] = None) -> None:
    """Raises `ChatUsageError` (one line) unless `output_path` can be written: not a
    directory, not the input file itself, its folder a directory that exists or can be
    created and is writable. Creates the folder; logs a warning when an existing file will
    be replaced. Called before the model loads, so a bad path costs no loading time."""
    out = os.path.abspath(output_path)
    if os.path.isdir(out):
        raise ChatUsageError(f"--output {output_path!r} is a directory; give a file path")
    if input_path is not None and os.path.realpath(out) == os.path.realpath(input_path):
        raise ChatUsageError(f"--output {output_path!r} is the input file; writing answers "
                             "there would destroy the questions: choose another path")
    parent = os.path.dirname(out)
    existing = parent
    while not os.path.exists(existing):  # the nearest folder that exists decides
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ChatUsageError(f"--output {output_path!r}: {existing!r} is a file, not a folder")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise ChatUsageError(f"--output {output_path!r}: cannot create {parent!r} "
                             f"({e.strerror or e})") from e
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ChatUsageError(f"--output {output_path!r}: folder {parent!r} is not writable")
    if os.path.exists(out):
        if not os.access(out, os.W_OK):
            raise ChatUsageError(f"--output {output_path!r} exists and is not writable")
        log.warning("replacing the existing file %s", output_path)


def _load_checked(path: str, max_seconds: float) -> np.ndarray:
    audio = load_audio(path)
    secs = len(audio) / 16000.0
    if secs > max_seconds:
        raise ValueError(f"audio file {path!r} lasts {secs:.1f} s, over the {max_seconds:.0f} s "
                         "the encoder hears")
    return audio


def _item_failure(item: dict, e: BaseException) -> str:
    """The error text of an item whose audio could not be read."""
    if isinstance(e, (ValueError, OSError)):  # these messages name the file already
        return str(e)
    # MemoryError and the like usually carry no text; name the file and the kind
    return f"{item['audio']}: {type(e).__name__}: {e}".rstrip(": ")


def _answer_record(item: dict, reply) -> Dict:
    """The output line of an answered item; ValueError when the reply cannot be written
    as strict JSON (non-finite emotion probabilities)."""
    probs = {k: float(v) for k, v in reply.probabilities.items()}
    if not all(math.isfinite(p) for p in probs.values()):
        raise ValueError("the model's emotion probabilities are not finite (NaN/inf): no "
                         "answer written")
    return {"question_id": item["id"], "audio": item.get("shown_audio", item["audio"]),
            "prediction": reply.text,
            "prediction_units": None if reply.units is None else " ".join(
                str(u) for u in reply.units),
            "emotion": {"label": reply.emotion, "probabilities": probs},
            **({"paralinguistic": dict(reply.cues)} if getattr(reply, "cues", None) else {}),
            **({"analysis": reply.analysis} if getattr(reply, "analysis", None) else {}),
            **({"heard": reply.heard} if getattr(reply, "heard", None) is not None else {})}


UNIT_DECODER_DIR = "unit_decoder"  # a model folder may hold its units-to-waveform decoder here


def resolve_unit_decoder(spec, model_path=None):
    """(config, params) of the units-to-waveform decoder chat speaks with: `spec` is a
    (config, params) pair, a folder (the release's decoder folder or one `convert --kind
    unit_decoder` wrote), or None for `<model folder>/unit_decoder`; ChatUsageError naming
    what to pass when there is none."""
    if isinstance(spec, tuple):
        return spec
    path = spec
    if path is None and isinstance(model_path, (str, os.PathLike)):
        cand = os.path.join(os.fspath(model_path), UNIT_DECODER_DIR)
        path = cand if os.path.isdir(cand) else None
    if path is None:
        raise ChatUsageError("--audio-out needs a units-to-waveform decoder: pass "
                             "--unit-decoder PATH (the release's decoder folder, or a "
                             "`convert --kind unit_decoder` output), or put it in the model "
                             f"folder as {UNIT_DECODER_DIR}/")
    if not os.path.isdir(path):
        raise ChatUsageError(f"--unit-decoder {path!r} is not a folder")
    return load_unit_decoder(path)


def _safe_name(qid) -> str:
    """A file name for a question id (path separators and odd characters replaced)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(qid)).strip("._") or "item"
    return name[:120]


class _Speaker:
    """Writes each answered item's units as `<dir>/<question_id>.wav` at the decoder's rate
    (22,050 Hz for the release's decoder, 16 kHz for the demo's unit codec)."""

    def __init__(self, decoder, directory: str, seed: int):
        self.voice = Voice(decoder)
        self.dir, self.seed = directory, int(seed)
        os.makedirs(directory, exist_ok=True)
        self.used: Dict[str, int] = {}

    def __call__(self, qid, units) -> str:
        """The written path; ValueError naming the problem for units it cannot speak."""
        wav = self.voice.decode(units, seed=self.seed)
        name = _safe_name(qid)
        n = self.used.get(name, 0)
        self.used[name] = n + 1
        path = os.path.join(self.dir, f"{name}.wav" if not n else f"{name}-{n}.wav")
        sf.write(path, np.clip(wav, -1.0, 1.0), self.voice.sampling_rate, subtype="PCM_16")
        return path


def run_chat(model_path_or_config, input_path: str, output_path: str, *,
             temperature: float = 0.7, max_new_tokens: int = 256, seed: int = 42,
             batch_size: int = 4, top_k: Optional[int] = None, top_p: Optional[float] = None,
             max_seconds: float = MAX_SECONDS, progress: bool = True,
             speech: bool = True, init_overrides: Optional[Dict[str, str]] = None,
             audio_out: Optional[str] = None, unit_decoder=None,
             dual_thinking: Optional[bool] = None, mesh=None,
             unit_temperature: Optional[float] = None) -> int:
    """Answers every item of `input_path` (one audio file or a JSONL manifest) into
    `output_path` (JSONL, one line per item, flushed as written). Returns the number of
    items that failed.

    Output lines (strict JSON: never NaN): `question_id`, `audio`, `prediction` (text),
    `prediction_units` (space-separated unit ids as the release writes them; null without a
    speech decoder), `emotion` ({"label", "probabilities"}); a failed item (a malformed or
    duplicate manifest line, missing, unreadable or empty audio, over `max_seconds`, any
    error while reading it, non-finite probabilities) gets `error` instead and the others go
    on. The input and output paths are checked before the model loads (`ChatUsageError`).
    Batches are padded to `batch_size` so one compiled shape serves all; batch i samples
    with fold_in(key(seed), i). `init_overrides` ({"llm": path, "whisper": path, ...})
    replaces frozen-part paths a training config names (see `load_chat_model`).

    audio_out: a folder; each answered item's speech units are decoded to a waveform
    (`models.decode_units`, seeded by `seed`) and written as `<audio_out>/<question_id>.wav`,
    and its line gets `prediction_audio` (the path). `unit_decoder`: the decoder's folder or
    a (config, params) pair (default `<model folder>/unit_decoder`). Units a decoder cannot
    speak (none, empty, outside its codebook) are an error of that item only.

    dual_thinking: True / False switches the OSUM-EChat analysis that opens each reply on or
    off (the line gets `analysis`; `prediction` stays the reply); None keeps the model's
    default (the checkpoint's `data.dual_thinking`). Lines of a model with paralinguistic
    heads also get `paralinguistic` ({"gender": "female", ...}); of a model with snapped speech
    (`projector.snap_to_vocab`, the demo), `heard`: what the LLM read as text.
    mesh: run sharded (a Mesh, a shape or "DATAxFSDPxTENSOR"; see `load_chat_model`).
    unit_temperature: speech-unit sampling temperature of a model loaded here (default the
    checkpoint's `data.unit_temperature`, else the release's 1.0); a ChatModel passed in
    keeps its own.
    """
    items = read_items(input_path)
    check_output(output_path, input_path)
    speaker = (_Speaker(resolve_unit_decoder(unit_decoder, model_path_or_config), audio_out,
                        seed) if audio_out else None)
    if isinstance(model_path_or_config, ChatModel):
        chat_model = model_path_or_config
        if dual_thinking is not None and bool(dual_thinking) != chat_model.dual_thinking:
            # the caller's model is left as it was: this run answers with a shallow copy
            chat_model = copy.copy(chat_model)
            chat_model.dual_thinking = bool(dual_thinking)
    else:
        extra = {} if dual_thinking is None else {"dual_thinking": bool(dual_thinking)}
        if unit_temperature is not None:
            extra["unit_temperature"] = unit_temperature
        chat_model = load_chat_model(model_path_or_config, init_overrides=init_overrides,
                                     mesh=mesh,
                                     **extra)
    failed = 0
    base_key = jax.random.key(int(seed))
    with open(output_path, "w", encoding="utf-8") as out, tqdm(
            total=len(items), desc="chat", unit="item", disable=not progress) as bar:
        def write(rec):
            line = json.dumps(rec, ensure_ascii=False, allow_nan=False)
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the input): escape it
                line = json.dumps(rec, allow_nan=False)
            out.write(line + "\n")
            out.flush()

        def error(item, msg):
            nonlocal failed
            failed += 1
            write({"question_id": item["id"], "audio": item.get("shown_audio", item["audio"]),
                   "error": msg})

        for bi, start in enumerate(range(0, len(items), batch_size)):
            batch = items[start:start + batch_size]
            good, audios = [], []
            for it in batch:
                if "error" in it:
                    continue
                try:
                    audios.append(_load_checked(it["audio"], max_seconds))
                    good.append(it)
                except Exception as e:  # MemoryError included: one item, not the run
                    it["error"] = _item_failure(it, e)
            results = {}
            if good:
                try:
                    replies = chat_model.respond(
                        audios, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=jax.random.fold_in(base_key, bi),
                        speech=speech, pad_batch_to=batch_size)
                    results = {id(it): r for it, r in zip(good, replies)}
                except Exception as e:  # one bad batch must not end the run
                    log.exception("batch %d failed", bi)
                    for it in good:
                        it["error"] = f"{type(e).__name__}: {e}"
            for it in batch:
                if "error" not in it:
                    try:
                        rec = _answer_record(it, results[id(it)])
                        if speaker is not None:
                            rec["prediction_audio"] = speaker(it["id"], results[id(it)].units)
                        write(rec)
                        continue
                    except (ValueError, TypeError) as e:  # not writable / not speakable
                        it["error"] = str(e)
                error(it, it["error"])
            bar.update(len(batch))
    return failed
