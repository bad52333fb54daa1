"""The paper's Table 5 ablation on the same items, with the controls the referee asked for.

Settings (every one greedy, same items, same frozen LLM):
1. speech_feature: speech + the emotion embedding (the model as trained; `chat`'s reply);
2. transcript_feature: the transcript in place of the speech + the emotion embedding;
3. transcript_random_label: the transcript + a random emotion label written in text (seeded);
4. transcript_true_label: the transcript + the true label in text (the stage-2b teacher's
   prompt: its reply is the reference the similarity is measured against, so its similarity
   is 1 by construction);
5. speech_zero_emotion: setting 1 with the emotion embedding zeroed (the emotion signal
   removed, everything else fixed);
6. speech_shuffled_emotion: setting 1 with another item's emotion embedding (a seeded
   permutation: the emotion signal randomised, everything else fixed).
Per-item scores: `similarity` (ROUGE-L F1 to the setting-4 reply), `acknowledges` (the reply
acknowledges a feeling), and with a judge the `empathy` rating; each setting's mean comes
with a 95% bootstrap interval. Items need `audio`, `transcript` and `emotion`.
"""

from __future__ import annotations

import os
from typing import List

import numpy as np
from tqdm import tqdm

from freezeempath_jax.evaluation.common import (acknowledges_emotion, batches, load_clips,
                                                mean_with_ci, rouge_l)
from freezeempath_jax.evaluation.empathy import judge_scores
from freezeempath_jax.evaluation.replies import (emotion_embeddings, speech_replies,
                                                 text_replies, transcript_feature_replies)
from freezeempath_jax.text.prompts import teacher_content

SETTINGS = ("speech_feature", "transcript_feature", "transcript_random_label",
            "transcript_true_label", "speech_zero_emotion", "speech_shuffled_emotion")
REFERENCE = "transcript_true_label"


def _permutation(n: int, seed: int) -> np.ndarray:
    """A seeded permutation that moves every item when n > 1 (a cyclic shift of a shuffle),
    so no clip keeps its own emotion embedding."""
    order = np.random.default_rng(seed).permutation(n)
    perm = np.empty(n, np.int64)
    perm[order] = np.roll(order, 1)
    return perm


def evaluate_ablation(chat_model, records: List[dict], *, judge=None, batch_size: int = 8,
                      max_new_tokens: int = 128, resamples: int = 1000, seed: int = 0,
                      progress: bool = True) -> dict:
    """Replies of every setting per item (`replies.{setting}`) and the side-by-side table."""
    labels = list(chat_model.config.emotions)
    for r in records:
        if "error" not in r:
            missing = [k for k in ("audio", "transcript", "emotion") if not r.get(k)]
            if missing and not (missing == ["audio"] and r.get("samples") is not None):
                r["error"] = f"missing field(s) {missing}"
    good = [r for r in records if "error" not in r]
    clips = load_clips(good)
    pairs = [(r, c) for r, c in zip(good, clips) if c is not None]
    items = [r for r, _ in pairs]
    clips = [c for _, c in pairs]
    rng = np.random.default_rng(seed)
    for it in items:
        it["random_label"] = labels[int(rng.integers(len(labels)))]
        it["replies"] = {}
    # the emotion embeddings of every clip first: setting 6 gives each item another's
    emo = [e for p in batches(clips, batch_size)
           for e in emotion_embeddings(chat_model, list(p), batch_size)]
    perm = _permutation(len(items), seed)
    kw = dict(width=batch_size, max_new_tokens=max_new_tokens)
    with tqdm(total=len(items) * len(SETTINGS), desc="ablation", unit="reply",
              disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            part = items[start:start + batch_size]
            pc = clips[start:start + batch_size]
            pe = emo[start:start + len(part)]
            texts = [it["transcript"] for it in part]
            out = {
                "speech_feature": speech_replies(chat_model, pc, **kw),
                "transcript_feature": transcript_feature_replies(chat_model, texts, pe, **kw),
                "transcript_random_label": text_replies(chat_model, [
                    teacher_content(it["transcript"], it["random_label"]) for it in part], **kw),
                "transcript_true_label": text_replies(chat_model, [
                    teacher_content(it["transcript"], it["emotion"]) for it in part], **kw),
                "speech_zero_emotion": speech_replies(chat_model, pc, emotion="zero", **kw),
                "speech_shuffled_emotion": speech_replies(
                    chat_model, pc, emotion="given",
                    emotion_values=[emo[j] for j in perm[start:start + len(part)]], **kw),
            }
            for setting, texts_out in out.items():
                for it, t in zip(part, texts_out):
                    it["replies"][setting] = t
            bar.update(len(part) * len(SETTINGS))
    table = {}
    for s in SETTINGS:
        sims = [rouge_l(it["replies"][s], it["replies"][REFERENCE]) for it in items]
        acks = [float(acknowledges_emotion(it["replies"][s])) for it in items]
        for it, sim, ack in zip(items, sims, acks):
            it.setdefault("similarity", {})[s] = sim
            it.setdefault("acknowledges", {})[s] = bool(ack)
        row = {"similarity": mean_with_ci(sims, resamples=resamples, seed=seed),
               "acknowledges": mean_with_ci(acks, resamples=resamples, seed=seed)}
        if judge is not None:
            views = [dict(transcript=it["transcript"], emotion=it["emotion"],
                          reply=it["replies"][s]) for it in items]
            bad = judge_scores(judge, views)
            for it, v in zip(items, views):
                it.setdefault("empathy", {})[s] = v.get("empathy")
                if "score_errors" in v:
                    it.setdefault("score_errors", {})[f"empathy/{s}"] = v["score_errors"].get(
                        "empathy")
            row["empathy"] = mean_with_ci([v["empathy"] for v in views
                                           if v.get("empathy") is not None],
                                          resamples=resamples, seed=seed)
            row["judge_unparseable"] = bad["empathy"]
        table[s] = row
    return {"task": "ablation", "n": len(items),
            "n_errors": sum(1 for r in records if "error" in r), "settings": list(SETTINGS),
            "reference": REFERENCE, "similarity_metric": "ROUGE-L F1", "table": table}


def markdown_table(results: dict) -> str:
    """The ablation table as markdown: mean [95% CI] per setting and score."""
    scores = [k for k in ("similarity", "acknowledges", "empathy")
              if any(k in row for row in results["table"].values())]
    lines = ["| setting | " + " | ".join(scores) + " |",
             "|---|" + "---|" * len(scores)]
    for i, s in enumerate(results["settings"], 1):
        row = results["table"][s]
        cells = []
        for k in scores:
            m = row.get(k)
            cells.append("-" if m is None else
                         f"{m['mean']:.3f} [{m['ci']['low']:.3f}, {m['ci']['high']:.3f}]")
        lines.append(f"| {i}. {s} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"n = {results['n']} items ({results['n_errors']} not scored); similarity: "
                 f"{results['similarity_metric']} to the {results['reference']} reply "
                 "(1 for that setting by construction).")
    return "\n".join(lines) + "\n"


def write_table(results: dict, out_dir: str) -> str:
    """DIR/ablation.md."""
    path = os.path.join(out_dir, "ablation.md")
    with open(path, "w") as f:
        f.write(markdown_table(results))
    return path
