"""Retention: the frozen LLM inside the trained model answers text-only prompts exactly as the
same LLM loaded alone (the point of freezing it: no forgetting). Both answer greedily in the
same chat frame; the score is n_identical / n, with the differing items listed.

Items `{"id", "prompt"}` (`text`, `instruction` and `question` are accepted too).
"""

from __future__ import annotations

from typing import List

from tqdm import tqdm

from freezeempath_jax.evaluation.common import batches
from freezeempath_jax.evaluation.replies import llm_replies, text_replies

PROMPT_KEYS = ("prompt", "text", "instruction", "question")


def evaluate_retention(chat_model, records: List[dict], llm, *, batch_size: int = 8,
                       max_new_tokens: int = 128, progress: bool = True) -> dict:
    """llm: `(config, params, tokenizer)` of the LLM alone (e.g. `distill.load_llm(path)`).
    Each record gets `model_reply`, `llm_reply` and `identical`, or an `error`."""
    config, params, tokenizer = llm
    for r in records:
        if "error" not in r:
            text = next((r[k] for k in PROMPT_KEYS if isinstance(r.get(k), str) and r[k]), None)
            if text is None:
                r["error"] = f"missing field: one of {list(PROMPT_KEYS)}"
            else:
                r["prompt"] = text
    items = [r for r in records if "error" not in r]
    with tqdm(total=len(items), desc="retention", unit="prompt", disable=not progress) as bar:
        for part in batches(items, batch_size):
            prompts = [it["prompt"] for it in part]
            inside = text_replies(chat_model, prompts, width=batch_size,
                                  max_new_tokens=max_new_tokens)
            alone = llm_replies(config, params, tokenizer, prompts, fmt=chat_model.fmt,
                                width=batch_size, max_new_tokens=max_new_tokens,
                                bucket=chat_model.prompt_bucket)
            for it, a, b in zip(part, inside, alone):
                it.update(model_reply=a, llm_reply=b, identical=a == b)
            bar.update(len(part))
    same = sum(1 for it in items if it["identical"])
    return {"task": "retention", "n": len(items), "n_identical": same,
            "identical_rate": same / len(items) if items else float("nan"),
            "n_errors": sum(1 for r in records if "error" in r),
            "differing_ids": [it["id"] for it in items if not it["identical"]]}
