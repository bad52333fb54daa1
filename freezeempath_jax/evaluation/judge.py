"""An LLM judge: any causal LM our loaders read scores replies 1-10 with a rating written
`[[N]]` (the convention of the paper's judge prompts, DESIGN.md section 10).

The prompt texts are this project's own wording of the paper's two criteria (response
quality; empathy toward the user's emotional tone). An answer without a parseable rating in
1..10 is counted as unparseable and given no score: it is never guessed.
"""

from __future__ import annotations

import re
from typing import Callable, List, Optional, Sequence

from freezeempath_jax.text.prompts import ChatFormat

JUDGE_SYSTEM = "You are a careful, impartial judge of conversations between a user and an AI."

QUALITY_PROMPT = (
    "Rate the assistant's reply to the user's spoken request below.\n"
    "Judge how helpful, correct, relevant and clear the reply is; a short reply is fine when "
    "it answers the request.\n\n"
    "User request: {instruction}\n\nAssistant reply: {reply}\n\n"
    "Give one or two sentences of reasons, then a rating from 1 (useless) to 10 (excellent) "
    "written exactly as [[N]], for example [[7]].")

EMPATHY_PROMPT = (
    "Rate how empathetic the assistant's reply is toward the user's emotional state.\n"
    "The user said the request below in a {emotion} tone of voice. An empathetic reply "
    "notices that feeling and answers in a fitting way: cheerful and warm for a happy user, "
    "gentle and comforting for a sad one, calm and understanding for an angry one, and "
    "natural for a neutral one.\n\n"
    "User request: {instruction}\nUser's tone: {emotion}\n\nAssistant reply: {reply}\n\n"
    "Give one or two sentences of reasons, then a rating from 1 (no empathy) to 10 (fully "
    "fitting empathy) written exactly as [[N]], for example [[7]].")

_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")


def parse_rating(answer: str, low: float = 1, high: float = 10) -> Optional[float]:
    """The first `[[N]]` rating of a judge answer within [low, high]; None when there is none
    (the caller counts it as unparseable)."""
    for m in _RATING.finditer(answer or ""):
        v = float(m.group(1))
        if low <= v <= high:
            return v
    return None


class LMJudge:
    """A causal LM as judge: `judge(prompts) -> answers` (greedy, batched).

    path: anything `distill.load_llm` reads (Hugging Face directory, `.gguf`, converted LLM).
    chat_template: the judge's chat frame ("chatml" for Qwen / SmolLM2, "plain" otherwise).
    """

    def __init__(self, config, params, tokenizer, *, chat_template: str = "chatml",
                 system_prompt: str = JUDGE_SYSTEM, batch_size: int = 4,
                 max_new_tokens: int = 128):
        self.config, self.params, self.tokenizer = config, params, tokenizer
        self.fmt = ChatFormat.named(chat_template, system_prompt)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    @classmethod
    def load(cls, path: str, **kwargs) -> "LMJudge":
        """Reads the judge model and its tokenizer."""
        from freezeempath_jax.distill import load_llm

        config, params, tokenizer = load_llm(path)
        return cls(config, params, tokenizer, **kwargs)

    def __call__(self, prompts: Sequence[str]) -> List[str]:
        from freezeempath_jax.evaluation.replies import llm_replies

        return llm_replies(self.config, self.params, self.tokenizer, list(prompts),
                           fmt=self.fmt, width=self.batch_size,
                           max_new_tokens=self.max_new_tokens)


Judge = Callable[[Sequence[str]], List[str]]


def rate(judge: Judge, prompts: Sequence[str]) -> List[dict]:
    """Per prompt: {"rating": float or None, "answer": the judge's text}."""
    answers = judge(list(prompts)) if prompts else []
    return [{"rating": parse_rating(a), "answer": a} for a in answers]
