"""What every evaluation task shares: manifests with per-item errors, clip loading, text
normalisation and similarity, bootstrap intervals, and the output files.

Output of a task in DIR: `results.json` (the scores, every interval with its seed and
resample count), `items.jsonl` (one line per input item: its fields, what the model said,
its per-item scores, or `error` for an item that could not be scored).
"""

from __future__ import annotations

import json
import os
import re
import string
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np

from freezeempath_jax.audio import load_audio

SAMPLE_RATE = 16000
MAX_SECONDS = 30.0


# ---------------------------------------------------------------------------------- items


def read_manifest(path: str, required: Sequence[str] = ("audio",)) -> List[dict]:
    """Items of a JSONL manifest, every field kept. `id` defaults to `question_id` or the line
    number; relative audio paths that do not exist as given resolve against the manifest's
    folder. A line that is not JSON or lacks a `required` field becomes an item with `error`
    (it is reported, never scored)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input {path!r} does not exist")
    base = os.path.dirname(os.path.abspath(path))
    items = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("a line must be a JSON object")
            except ValueError as e:
                items.append({"id": f"line{n}", "error": f"{path}:{n}: not a JSON object ({e})"})
                continue
            rec.setdefault("id", rec.get("question_id", f"line{n}"))
            audio = rec.get("audio", rec.get("speech"))
            if isinstance(audio, str) and audio:
                rec["audio"] = audio
                if not os.path.isabs(audio) and not os.path.exists(audio):
                    rec["audio"] = os.path.join(base, audio)
            missing = [k for k in required if rec.get(k) in (None, "", [])]
            if missing:
                rec["error"] = f"{path}:{n}: missing field(s) {missing}"
            items.append(rec)
    return items


def load_clip(item: dict, max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """The 16 kHz float clip of an item: `samples` (already decoded, e.g. from TFDS) or the
    file at `audio`. Raises ValueError / OSError for a missing, unreadable, empty or too long
    clip (the caller records it as the item's error)."""
    if item.get("samples") is not None:
        a = np.asarray(item["samples"], np.float32)
    else:
        a = load_audio(item["audio"])
    if a.size == 0:
        raise ValueError(f"audio {item.get('audio', item['id'])!r} is empty")
    if a.size > max_seconds * SAMPLE_RATE:
        raise ValueError(f"audio {item.get('audio', item['id'])!r} lasts "
                         f"{a.size / SAMPLE_RATE:.1f} s, over the {max_seconds:.0f} s the "
                         "encoder hears")
    return a


def load_clips(items: Sequence[dict], max_seconds: float = MAX_SECONDS) -> List[Optional[
        np.ndarray]]:
    """Clips of `items` (None where an item already has or now gets an `error`)."""
    out = []
    for it in items:
        if "error" in it:
            out.append(None)
            continue
        try:
            out.append(load_clip(it, max_seconds))
        except Exception as e:  # any decoder failure is this item's problem only
            it["error"] = f"bad clip: {type(e).__name__}: {e}"
            out.append(None)
    return out


def batches(seq: Sequence, size: int) -> Iterable[Sequence]:
    """Consecutive slices of at most `size`."""
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


# ----------------------------------------------------------------------------------- text


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation + "\u2018\u2019\u201c\u201d"})


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation and articles removed, spaces collapsed (the SQuAD / OpenAudio
    convention used to decide whether a gold answer occurs in a reply)."""
    text = str(text).lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_in_reply(reply: str, answers: Sequence[str]) -> bool:
    """Whether a normalised gold answer occurs, as whole words, in the normalised reply."""
    r = f" {normalize_answer(reply)} "
    return any(a and f" {a} " in r for a in (normalize_answer(x) for x in answers))


def token_f1(pred: str, ref: str) -> float:
    """Bag-of-tokens F1 of normalised texts (1.0 for two empty texts)."""
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum(min(p.count(t), r.count(t)) for t in set(p))
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 (longest common subsequence of normalised tokens; 1.0 for two empty texts).

    The judge-free similarity of a reply to the frozen LLM's own reply: unlike bag-of-words F1
    it rewards the same content in the same order (an empathetic opening then the answer), it
    needs no model or download, and it is a standard response-similarity score."""
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)
    for tp in p:
        cur = [0]
        for j, tr in enumerate(r):
            cur.append(prev[j] + 1 if tp == tr else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


# A reply that names or answers a feeling: condolence / understanding phrases and emotion
# words. A lexical proxy (no model needed) for "the reply acknowledges the user's emotion",
# the behaviour of DESIGN.md section 10 ("I'm sorry to hear that you're frustrated").
_ACK = re.compile(
    r"\b(sorry to hear|i understand|i can (see|tell|hear|imagine|understand)|that sounds|"
    r"you sound|you('re| are) (feeling|upset|frustrated|excited|sad|happy|angry)|"
    r"feel(s|ing)?|frustrat\w*|upset\w*|angry|anger|annoy\w*|sad(ness)?|sorry|happy|glad|"
    r"excit\w*|joy\w*|surpris\w*|amaz\w*|wonderful|congratulations|worr\w*|stress\w*)\b",
    re.IGNORECASE)


def acknowledges_emotion(reply: str) -> bool:
    """Whether a reply acknowledges a feeling (see `_ACK`)."""
    return bool(_ACK.search(reply or ""))


# ------------------------------------------------------------------------------ bootstrap


def bootstrap_ci(n: int, statistic: Callable[[np.ndarray], float], *, resamples: int = 1000,
                 seed: int = 0, level: float = 0.95) -> Dict[str, float]:
    """Percentile bootstrap interval of `statistic(indices)` over `n` items resampled with
    replacement (seeded). Returns {"low", "high", "resamples", "seed", "level"}."""
    if n == 0:
        return {"low": float("nan"), "high": float("nan"), "resamples": 0, "seed": seed,
                "level": level}
    rng = np.random.default_rng(seed)
    stats = np.array([statistic(rng.integers(0, n, n)) for _ in range(resamples)], np.float64)
    a = (1 - level) / 2
    lo, hi = np.nanquantile(stats, [a, 1 - a])
    return {"low": float(lo), "high": float(hi), "resamples": int(resamples), "seed": int(seed),
            "level": level}


def mean_with_ci(values: Sequence[float], **kw) -> Dict[str, float]:
    """{"mean", "n", "ci": bootstrap interval of the mean} of per-item values (NaN = not
    scored, left out)."""
    v = np.asarray([x for x in values if x is not None and not np.isnan(x)], np.float64)
    return {"mean": float(v.mean()) if v.size else float("nan"), "n": int(v.size),
            "ci": bootstrap_ci(v.size, lambda idx: float(v[idx].mean()), **kw)}


# -------------------------------------------------------------------------------- outputs


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return str(x)


def write_outputs(out_dir: str, results: dict, items: Sequence[dict]) -> None:
    """DIR/results.json and DIR/items.jsonl (decoded samples are not written)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=_jsonable)
    with open(os.path.join(out_dir, "items.jsonl"), "w") as f:
        for it in items:
            rec = {k: v for k, v in it.items() if k != "samples"}
            f.write(json.dumps(rec, ensure_ascii=False, default=_jsonable) + "\n")


def error_count(items: Sequence[dict]) -> int:
    """Items that carry an `error`."""
    return sum(1 for it in items if "error" in it)
