"""Training targets written by the frozen LLM itself (self-distillation).

Three modes, one per recipe stage (DESIGN.md section 5):
- "reply"          stage 1: the LLM's own reply to the *transcript*; the student later sees the
                   speech instead and learns to give the same reply.
- "emotion_reply"  stage 2 (BLSP-Emo style emotion-aware replies): the transcript plus the
                   clip's emotion label, as the trainer's teacher writes it
                   (`text.PromptRecipe.teacher_emotion`: "<transcript> (with a <emotion>
                   emotional tone).").
- "empathetic"     stage 2b: a neutral instruction paired with a random emotion (seeded); the
                   record keeps the drawn emotion so the data side can pair it with a clip of
                   that emotion.

Output: one JSON line per input record, the record's fields plus `reply`, `reply_mode` and
(emotion modes) `reply_emotion`. Records without a transcript are reported and skipped.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Iterable, Iterator, List, Optional, Sequence

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from freezeempath_jax.checkpoints import load_causal_lm, load_converted
from freezeempath_jax.checkpoints.formats import CONFIG_FILE
from freezeempath_jax.inference.sampling import generate_text, strip_after_eos
from freezeempath_jax.models.configs import EMOTIONS, FreezeEmpathConfig
from freezeempath_jax.text.padding import left_pad, round_up
from freezeempath_jax.text.prompts import PromptRecipe, chat_text
from freezeempath_jax.text.tokenizers import load_tokenizer

log = logging.getLogger(__name__)

MODES = ("reply", "emotion_reply", "empathetic")


def user_text(record: dict, mode: str, recipe: Optional[PromptRecipe] = None,
              emotion: Optional[str] = None) -> str:
    """The user turn the teacher reads: the transcript, with the emotion when the mode wants
    it, written by the same `text.PromptRecipe` the trainer's self-distillation uses."""
    recipe = recipe or PromptRecipe()
    transcript = record["transcript"].strip()
    return recipe.teacher_text(transcript, None if mode == "reply" else emotion)


def pick_emotion(record: dict, mode: str, index: int, seed: int,
                 emotions: Sequence[str]) -> Optional[str]:
    """Emotion for the prompt: the record's own label, or a seeded draw for "empathetic"."""
    if mode == "reply":
        return None
    if mode == "empathetic":
        return emotions[np.random.default_rng([seed, index]).integers(len(emotions))]
    emotion = record.get("emotion")
    if emotion not in emotions:
        raise ValueError(f"record {record.get('id')!r}: mode 'emotion_reply' needs an 'emotion' "
                         f"field in {list(emotions)}, got {emotion!r}")
    return emotion


def _bucket(n: int, step: int = 32) -> int:
    """Prompt lengths rounded up so a few compiled shapes serve every batch."""
    return max(step, round_up(n, step))


def distill_records(llm_config, llm_params, tokenizer, records: Iterable[dict], *,
                    mode: str = "reply", prompt_config: Optional[FreezeEmpathConfig] = None,
                    max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
                    batch_size: int = 8, progress: bool = True,
                    recipe: Optional[PromptRecipe] = None) -> Iterator[dict]:
    """Yields each usable record with the frozen LLM's reply added, batch by batch.

    Batches keep static shapes (the last one is padded with dummy rows, prompt lengths are
    bucketed) so the jitted generation compiles a handful of times at most.
    """
    if mode not in MODES:
        raise ValueError(f"unknown distill mode {mode!r}; choose from {MODES}")
    cfg = prompt_config or FreezeEmpathConfig()
    emotions = tuple(cfg.emotions or EMOTIONS)
    eos = tokenizer.eos_token_id
    eos_ids = [eos] + [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>",)
                       if t in tokenizer.get_vocab()]
    eos_ids = sorted({i for i in eos_ids if i is not None})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]

    records = list(records)
    usable, skipped = [], 0
    for i, r in enumerate(records):
        if not isinstance(r.get("transcript"), str) or not r["transcript"].strip():
            log.warning("distill: record %r has no transcript; skipped", r.get("id", i))
            skipped += 1
            continue
        emotion = pick_emotion(r, mode, i, seed, emotions)
        text = chat_text(tokenizer, cfg, user_text(r, mode, recipe, emotion))
        usable.append((r, emotion, tokenizer.encode(text, add_special_tokens=False)))
    if skipped:
        log.warning("distill: %d of %d records skipped (no transcript)", skipped, len(records))

    bar = tqdm(total=len(usable), desc=f"distill ({mode})", disable=not progress)
    for start in range(0, len(usable), batch_size):
        chunk = usable[start:start + batch_size]
        prompts = [ids for _, _, ids in chunk]
        prompts += [prompts[-1]] * (batch_size - len(prompts))  # static batch size
        ids, mask = left_pad(prompts, pad, _bucket(max(map(len, prompts))))
        out = generate_text(llm_config, llm_params, ids, attention_mask=mask,
                            max_new_tokens=max_new_tokens, temperature=temperature,
                            seed=seed + start, eos_token_id=eos_ids, pad_token_id=pad)
        for (record, emotion, _), toks in zip(chunk, strip_after_eos(out, eos_ids)):
            row = dict(record)
            row["reply"] = tokenizer.decode(toks, skip_special_tokens=True).strip()
            row["reply_mode"] = mode
            if emotion is not None:
                row["reply_emotion"] = emotion
            yield row
        bar.update(len(chunk))
    bar.close()


def load_llm(model: str, dtype=None):
    """(LMConfig, params, tokenizer) from an HF directory, a .gguf file or a converted dir."""
    dtype = dtype or jnp.float32
    if os.path.isdir(model) and os.path.isfile(os.path.join(model, CONFIG_FILE)) and \
            os.path.isdir(os.path.join(model, "params")):
        kind, config, params = load_converted(model)
        if kind == "freezeempath":
            config, params = config.llm, params["llm"]
        elif kind != "llm":
            raise ValueError(f"{model}: holds a {kind!r} checkpoint; distill needs an LLM")
        tok_dir = os.path.join(model, "tokenizer")
        return config, params, load_tokenizer(tok_dir if os.path.isdir(tok_dir) else model)
    config, params = load_causal_lm(model, dtype=dtype)
    return config, params, load_tokenizer(model)


def read_jsonl(path: str) -> List[dict]:
    """Records of a JSONL file; a malformed line raises an error naming file and line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return out


def run_distill(model: str, input_path: str, output_path: str, *, mode: str = "reply",
                max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
                batch_size: int = 8) -> int:
    """`freezeempath-jax distill`: replies of the frozen LLM for a manifest; returns the count.

    Lines are flushed as they are written, so an interrupted run keeps what it finished.
    """
    config, params, tokenizer = load_llm(model)
    records = read_jsonl(input_path)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    n = 0
    with open(output_path, "w", encoding="utf-8") as f:
        for row in distill_records(config, params, tokenizer, records, mode=mode,
                                   max_new_tokens=max_new_tokens, temperature=temperature,
                                   seed=seed, batch_size=batch_size):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            n += 1
    return n
