"""Speech emotion recognition (paper: IEMOCAP session 5, MELD test, RAVDESS, CASIA, CaFE,
RESD): the SER head's label for each clip, exactly as `chat` reports it, scored against the
item's `emotion`.

Scores: accuracy (weighted: every clip counts once), unweighted accuracy (the mean of the
per-class recalls, what SER papers call UA; equal to scikit-learn's
`balanced_accuracy_score`), macro F1, the confusion matrix (rows = truth, columns =
prediction, both in the model's label order), and 95% percentile-bootstrap intervals of the
three scores (items resampled with replacement, seeded).

Paralinguistic heads (configs/osum_echat.py): when the model has a gender / age-group head
and items carry `gender` / `age_group`, the same clips are scored on each head too
(`results["paralinguistic"][head]`: accuracy, unweighted accuracy, confusion, intervals);
items without the label are left out of that head's scores only.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from freezeempath_jax.evaluation.common import batches, bootstrap_ci, load_clips
from freezeempath_jax.models.configs import AGE_GROUPS, EMOTIONS, GENDERS

# Record field and classes of each paralinguistic head.
CUE_FIELDS = {"gender": ("gender", GENDERS), "age": ("age_group", AGE_GROUPS)}

# Labels of the public SER sets mapped to the release's five classes (IEMOCAP merges
# "excited" into happy, as the paper's 5-class setup does).
ALIASES = {"ang": "angry", "anger": "angry", "hap": "happy", "happiness": "happy",
           "joy": "happy", "exc": "happy", "excited": "happy", "sad": "sad",
           "sadness": "sad", "neu": "neutral", "sur": "surprised", "surprise": "surprised"}


def canonical_label(label, labels: Sequence[str]) -> Optional[str]:
    """`label` as one of the model's `labels` (aliases accepted), or None."""
    lab = str(label).strip().lower()
    lab = lab if lab in labels else ALIASES.get(lab)
    return lab if lab in labels else None


def predict_emotions(chat_model, clips: Sequence[np.ndarray], batch_size: int = 8
                     ) -> List[str]:
    """The SER label of each clip, computed as `ChatModel.respond` computes it (the same
    encoder call, the same batch padding, argmax of the softmax)."""
    return predict_heads(chat_model, clips, batch_size)[0]


def predict_heads(chat_model, clips: Sequence[np.ndarray], batch_size: int = 8):
    """(SER labels, paralinguistic labels): the emotion of each clip as `predict_emotions`
    gives it, and each clip's {head: label} of the model's paralinguistic heads ({} without),
    from one encoder pass."""
    labels = chat_model.config.emotions
    out: List[str] = []
    cues: List[dict] = []
    for part in batches(list(clips), batch_size):
        enc = chat_model.encode(list(part), batch_size)
        probs = np.asarray(jax.nn.softmax(jnp.asarray(enc.ser_logits, jnp.float32), axis=-1))
        out += [labels[int(i)] for i in probs[:len(part)].argmax(-1)]
        rows = [{} for _ in part]
        for name, logits in (getattr(enc, "cue_logits", None) or {}).items():
            for i, k in enumerate(np.asarray(logits)[:len(part)].argmax(-1)):
                rows[i][name] = CUE_FIELDS[name][1][int(k)]
        cues += rows
    return out, cues


def head_scores(truth: Sequence[str], pred: Sequence[str], labels: Sequence[str], *,
                resamples: int = 1000, seed: int = 0) -> dict:
    """Scores of one classification head (a paralinguistic head): n, labels, accuracy,
    unweighted accuracy, macro F1, confusion (rows = truth) and 95% bootstrap intervals."""
    k = len(labels)
    t = np.array([list(labels).index(x) for x in truth], np.int64)
    p = np.array([list(labels).index(x) for x in pred], np.int64)
    scores = ser_scores(t, p, k)
    ci = {name: bootstrap_ci(len(t), lambda idx, name=name: ser_scores(t[idx], p[idx], k)[name],
                             resamples=resamples, seed=seed)
          for name in ("accuracy", "unweighted_accuracy")} if len(t) else {}
    return {"n": int(len(t)), "labels": list(labels), "accuracy": scores["accuracy"],
            "unweighted_accuracy": scores["unweighted_accuracy"],
            "macro_f1": scores["macro_f1"], "confusion": scores["confusion"].tolist(),
            "ci95": ci}


def ser_scores(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> dict:
    """accuracy, unweighted_accuracy (mean recall over the classes present in `truth`) and
    macro_f1 (mean F1 over the classes present in `truth` or `pred`, scikit-learn's
    convention) of integer labels, and the confusion matrix."""
    cm = np.bincount(truth * num_classes + pred, minlength=num_classes ** 2).reshape(
        num_classes, num_classes)
    support = cm.sum(1)
    present = support > 0
    tp = np.diag(cm).astype(np.float64)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=present)
    predicted = cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp),
                   where=(precision + recall) > 0)
    n = int(cm.sum())
    return {"accuracy": float(tp.sum() / max(n, 1)),
            "unweighted_accuracy": float(recall[present].mean()) if present.any() else 0.0,
            "macro_f1": float(f1[present | (predicted > 0)].mean()) if n else 0.0,
            "confusion": cm}


def evaluate_ser(chat_model, records: List[dict], *, batch_size: int = 8,
                 resamples: int = 1000, seed: int = 0, progress: bool = True) -> dict:
    """SER scores of `chat_model` on `records` ({"id", "audio" or "samples", "emotion"}).

    Each record gets `prediction` (and `probabilities` are not kept: `chat` has them), or an
    `error` (missing label, a label outside the model's classes, a bad clip) and is left out.
    Returns the results dict (see the module docstring).
    """
    labels = list(chat_model.config.emotions)
    for r in records:
        if "error" in r:
            continue
        lab = canonical_label(r.get("emotion", ""), labels)
        if lab is None:
            r["error"] = (f"emotion {r.get('emotion')!r} is not one of the model's labels "
                          f"{labels}")
        else:
            r["emotion"] = lab
    good = [r for r in records if "error" not in r]
    clips = load_clips(good)
    good = [r for r, c in zip(good, clips) if c is not None]
    clips = [c for c in clips if c is not None]
    with tqdm(total=len(good), desc="ser", unit="clip", disable=not progress) as bar:
        preds: List[str] = []
        cues: List[dict] = []
        for part in batches(clips, batch_size):
            e, c = predict_heads(chat_model, part, batch_size)
            preds += e
            cues += c
            bar.update(len(part))
    for r, p, c in zip(good, preds, cues):
        r["prediction"] = p
        r["correct"] = p == r["emotion"]
        for name, label in c.items():
            r[f"{name}_prediction"] = label
    truth = np.array([labels.index(r["emotion"]) for r in good], np.int64)
    pred = np.array([labels.index(p) for p in preds], np.int64)
    k = len(labels)
    scores = ser_scores(truth, pred, k)
    ci = {name: bootstrap_ci(len(truth), lambda idx, name=name: ser_scores(
        truth[idx], pred[idx], k)[name], resamples=resamples, seed=seed)
        for name in ("accuracy", "unweighted_accuracy", "macro_f1")}
    para = {}
    for name in sorted({n for c in cues for n in c}):
        field, classes = CUE_FIELDS[name]
        rows = [(r[field], c[name]) for r, c in zip(good, cues) if r.get(field) in classes]
        if rows:
            para[name] = head_scores([a for a, _ in rows], [b for _, b in rows], classes,
                                     resamples=resamples, seed=seed)
    out = {"task": "ser", "n": len(good), "n_errors": len(records) - len(good),
           "labels": labels, "accuracy": scores["accuracy"],
           "unweighted_accuracy": scores["unweighted_accuracy"],
           "macro_f1": scores["macro_f1"], "confusion": scores["confusion"].tolist(),
           "ci95": ci}
    if para:
        out["paralinguistic"] = para
    return out


def plot_confusion(results: dict, path: str, title: str = "SER") -> str:
    """Row-normalised confusion matrix PNG (counts written in the cells); `results` is the
    SER results or one head's scores (`results["paralinguistic"][head]`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(results["confusion"], np.float64)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    labels = results["labels"]
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, int(m[i, j]), ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}: UA {results['unweighted_accuracy']:.3f}, n {results['n']}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_tfds(name: str, split: str = "test", data_dir: Optional[str] = None) -> List[dict]:
    """Records of a prepared TFDS dataset of `data.builders` (`name` or `name/config`, e.g.
    "ravdess", "synthetic/tiny"), `split` one split or several joined by "+" ("train+test");
    audio is decoded from its int16 samples. The dataset must
    have been built (`data.builders.prepare`); nothing is built or downloaded here."""
    from freezeempath_jax.data.builders import BUILDERS

    base, _, config = name.partition("/")
    if base not in BUILDERS:
        raise ValueError(f"tfds:{name}: unknown dataset; expected one of {sorted(BUILDERS)}")
    kwargs = {"config": config} if config else {}
    builder = BUILDERS[base](data_dir=os.path.expanduser(data_dir) if data_dir else None,
                             **kwargs)
    if not builder.is_prepared():
        raise FileNotFoundError(f"tfds:{name} is not prepared in {builder.data_dir!r}; build it "
                                "with freezeempath_jax.data.builders.prepare(...) first")
    splits = sorted(builder.info.splits)
    # "train+test": the paper scores corpora unseen in training (RAVDESS, CASIA, CaFE) whole
    parts = split.split("+")
    unknown = [p for p in parts if p not in splits]
    if unknown:
        raise ValueError(f"tfds:{name} has no split {unknown[0]!r}; it has {splits} (--split; "
                         "'train+test' joins splits)")
    records = []
    for part in parts:
        source = builder.as_data_source(part)
        for i in range(len(source)):
            ex = source[i]
            rid = ex["id"].decode() if isinstance(ex["id"], bytes) else str(ex["id"])
            rec = {"id": rid, "emotion": EMOTIONS[int(ex["label"])],
                   "samples": np.asarray(ex["audio"], np.float32) / 32768.0}
            for field in ("gender", "age_group"):  # speaker metadata (builders >= 1.1.0)
                value = ex.get(field, b"") if hasattr(ex, "get") else b""
                value = value.decode() if isinstance(value, bytes) else str(value)
                if value:
                    rec[field] = value
            records.append(rec)
    return records
