"""Empathetic dialogue (paper: SpeechAlpaca quality / empathy from an LLM judge).

Items `{"id", "audio", "transcript"?, "emotion"?}`. Per item, the model's greedy reply to the
speech, then:
- `quality` and `empathy`: the judge's [[N]] ratings (`judge.QUALITY_PROMPT` needs the
  transcript, `judge.EMPATHY_PROMPT` the transcript and the emotion); an unparseable answer
  is counted and left unscored;
- `similarity` (judge-free): ROUGE-L F1 of the reply against the frozen LLM's own greedy
  reply to the transcript with the true emotion written in text (the stage-2b teacher's
  target), plus bag-of-words `token_f1`; ROUGE-L is the headline because it also rewards the
  order of the content (see `common.rouge_l`);
- `acknowledges`: the reply acknowledges a feeling (`common.acknowledges_emotion`).
A score whose inputs are missing is named in the item's `score_errors`; the rest are scored.
"""

from __future__ import annotations

from typing import List, Optional

from tqdm import tqdm

from freezeempath_jax.evaluation import judge as judge_lib
from freezeempath_jax.evaluation.common import (acknowledges_emotion, batches, load_clips,
                                                mean_with_ci, rouge_l, token_f1)
from freezeempath_jax.evaluation.replies import speech_replies, text_replies
from freezeempath_jax.text.prompts import teacher_content


def judge_scores(judge, items: List[dict], reply_key: str = "reply",
                 prefix: str = "") -> dict:
    """Adds `{prefix}quality` / `{prefix}empathy` (rating or None) to items holding a reply;
    returns the unparseable count per score. Items without the fields a prompt needs get a
    `score_errors` entry instead."""
    unparseable = {"quality": 0, "empathy": 0}
    for score, template, needs in (("quality", judge_lib.QUALITY_PROMPT, ("transcript",)),
                                   ("empathy", judge_lib.EMPATHY_PROMPT,
                                    ("transcript", "emotion"))):
        todo = []
        for it in items:
            if "error" in it or reply_key not in it:
                continue
            missing = [k for k in needs if not it.get(k)]
            if missing:
                it.setdefault("score_errors", {})[prefix + score] = f"missing field(s) {missing}"
                continue
            todo.append(it)
        prompts = [template.format(instruction=it["transcript"], emotion=it.get("emotion"),
                                   reply=it[reply_key]) for it in todo]
        for it, res in zip(todo, judge_lib.rate(judge, prompts)):
            it[prefix + score] = res["rating"]
            it[f"{prefix}{score}_judge_answer"] = res["answer"]
            if res["rating"] is None:
                unparseable[score] += 1
                it.setdefault("score_errors", {})[prefix + score] = (
                    "the judge's answer has no [[N]] rating in 1..10")
    return unparseable


def reference_replies(chat_model, items: List[dict], *, batch_size: int,
                      max_new_tokens: int) -> None:
    """Sets `reference_reply`: the frozen LLM's greedy reply to `transcript` with the true
    `emotion` in text, for items that have both (others get a `score_errors` entry)."""
    todo = []
    for it in items:
        if "error" in it:
            continue
        missing = [k for k in ("transcript", "emotion") if not it.get(k)]
        if missing:
            it.setdefault("score_errors", {})["similarity"] = f"missing field(s) {missing}"
        else:
            todo.append(it)
    for part in batches(todo, batch_size):
        refs = text_replies(chat_model, [teacher_content(it["transcript"], it["emotion"])
                                         for it in part], width=batch_size,
                            max_new_tokens=max_new_tokens)
        for it, ref in zip(part, refs):
            it["reference_reply"] = ref


def evaluate_empathy(chat_model, records: List[dict], *, judge=None, batch_size: int = 8,
                     max_new_tokens: int = 128, resamples: int = 1000, seed: int = 0,
                     progress: bool = True) -> dict:
    """Quality / empathy ratings (with a judge), similarity to the teacher reply and the
    acknowledgement rate, each a mean with a bootstrap interval."""
    good = [r for r in records if "error" not in r]
    clips = load_clips(good)
    pairs = [(r, c) for r, c in zip(good, clips) if c is not None]
    with tqdm(total=len(pairs), desc="empathy", unit="item", disable=not progress) as bar:
        for part in batches(pairs, batch_size):
            for (r, _), text in zip(part, speech_replies(
                    chat_model, [c for _, c in part], width=batch_size,
                    max_new_tokens=max_new_tokens)):
                r["reply"] = text
                r["acknowledges"] = acknowledges_emotion(text)
            bar.update(len(part))
    items = [r for r, _ in pairs]
    reference_replies(chat_model, items, batch_size=batch_size, max_new_tokens=max_new_tokens)
    for it in items:
        if "reference_reply" in it:
            it["similarity"] = rouge_l(it["reply"], it["reference_reply"])
            it["token_f1"] = token_f1(it["reply"], it["reference_reply"])
    unparseable: Optional[dict] = None
    if judge is not None:
        unparseable = judge_scores(judge, items)
    kw = dict(resamples=resamples, seed=seed)
    scores = {}
    for name in ("quality", "empathy", "similarity", "token_f1", "acknowledges"):
        vals = [float(it[name]) for it in items if it.get(name) is not None]
        if name in ("quality", "empathy") and judge is None:
            continue
        scores[name] = mean_with_ci(vals, **kw)
    return {"task": "empathy", "n": len(items),
            "n_errors": sum(1 for r in records if "error" in r),
            "judge_unparseable": unparseable, "similarity_metric": "ROUGE-L F1", "scores": scores}
