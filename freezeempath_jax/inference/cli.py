"""`freezeempath-jax chat`: answers a manifest of spoken questions into a JSONL file."""

from __future__ import annotations

import json
import logging
import os
from typing import List, Optional

import jax
import numpy as np
from tqdm import tqdm

from freezeempath_jax.audio import load_audio
from freezeempath_jax.inference.chat import MAX_SECONDS, ChatModel
from freezeempath_jax.inference.loading import load_chat_model

log = logging.getLogger(__name__)


def read_items(input_path: str) -> List[dict]:
    """Items `{"id", "audio"}` of a JSONL manifest (release format; `question_id` and
    `speech` are accepted as aliases; relative audio paths resolve against the manifest's
    folder when they do not exist as given) or of a single audio file."""
    if not os.path.exists(input_path):
        raise FileNotFoundError(f"--input {input_path!r} does not exist")
    if not input_path.endswith((".jsonl", ".json")):
        return [{"id": os.path.splitext(os.path.basename(input_path))[0], "audio": input_path}]
    base = os.path.dirname(os.path.abspath(input_path))
    items = []
    with open(input_path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                items.append({"id": f"line{n}", "audio": None,
                              "error": f"{input_path}:{n}: not JSON ({e})"})
                continue
            qid = rec.get("id", rec.get("question_id", f"line{n}"))
            audio = rec.get("audio", rec.get("speech"))
            item = {"id": qid, "audio": audio}
            if not isinstance(audio, str) or not audio:
                item["error"] = f"{input_path}:{n}: no 'audio' path in the record"
            elif not os.path.isabs(audio) and not os.path.exists(audio):
                item["audio"] = os.path.join(base, audio)
                item["shown_audio"] = audio
            items.append(item)
    return items


def _load_checked(path: str, max_seconds: float) -> np.ndarray:
    audio = load_audio(path)
    secs = len(audio) / 16000.0
    if secs > max_seconds:
        raise ValueError(f"audio file {path!r} lasts {secs:.1f} s, over the {max_seconds:.0f} s "
                         "the encoder hears")
    return audio


def run_chat(model_path_or_config, input_path: str, output_path: str, *,
             temperature: float = 0.7, max_new_tokens: int = 256, seed: int = 42,
             batch_size: int = 4, top_k: Optional[int] = None, top_p: Optional[float] = None,
             max_seconds: float = MAX_SECONDS, progress: bool = True,
             speech: bool = True) -> int:
    """Answers every item of `input_path` (one audio file or a JSONL manifest) into
    `output_path` (JSONL, one line per item, flushed as written). Returns the number of
    items that failed.

    Output lines: `question_id`, `audio`, `prediction` (text), `prediction_units` (space-
    separated unit ids as the release writes them; null without a speech decoder),
    `emotion` ({"label", "probabilities"}); a failed item (missing, unreadable or empty
    audio, over `max_seconds`) gets `error` instead and the others go on. Batches are
    padded to `batch_size` so one compiled shape serves all; batch i samples with
    fold_in(key(seed), i).
    """
    items = read_items(input_path)
    chat_model = (model_path_or_config if isinstance(model_path_or_config, ChatModel)
                  else load_chat_model(model_path_or_config))
    failed = 0
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    base_key = jax.random.key(int(seed))
    with open(output_path, "w") as out, tqdm(total=len(items), desc="chat", unit="item",
                                             disable=not progress) as bar:
        def write(rec):
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
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
                except (ValueError, OSError) as e:
                    it["error"] = str(e)
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
                if "error" in it:
                    error(it, it["error"])
                    continue
                r = results[id(it)]
                write({"question_id": it["id"], "audio": it.get("shown_audio", it["audio"]),
                       "prediction": r.text,
                       "prediction_units": None if r.units is None else " ".join(
                           str(u) for u in r.units),
                       "emotion": {"label": r.emotion, "probabilities": r.probabilities}})
            bar.update(len(batch))
    return failed
