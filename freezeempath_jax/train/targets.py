"""Training targets: replies the frozen LLM writes itself (self-distillation, cached on disk),
and synthetic stand-ins for corpora that lack a kind of target.

The synthetic targets (`toy_units`, `toy_attributes`) are fixed functions of the text or the
label, not measurements of any speech: they exist so the tiny random model and synthetic
smoke runs can exercise stages 3 and the RE-LLM head; real runs read units and attributes from
their manifests.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Mapping, Optional

import jax

from freezeempath_jax.inference import sampling
from freezeempath_jax.models.configs import FreezeEmpathConfig
from freezeempath_jax.real_models import model_spec
from freezeempath_jax.text.padding import left_pad, round_up
from freezeempath_jax.text.prompts import (ChatFormat, PromptBuilder, PromptRecipe,
                                           dual_thinking_prefix, paralinguistic_analysis)
from freezeempath_jax.train.features import cache_tag
from freezeempath_jax.train.step import TrainStep

log = logging.getLogger("freezeempath_jax.train")

PROMPT_BUCKET = 32  # teacher prompts are left-padded to a multiple of this


class ReplyDistiller:
    """Self-distillation: the frozen LLM's own greedy replies become the targets of stages 1,
    2b and 3, generated once per distinct (transcript, emotion) and kept in
    `data.cache_dir/replies-<tag>.json`."""

    def __init__(self, cfg, ts: TrainStep, frozen, tokenizer):
        self.cfg, self.ts, self.frozen, self.tok = cfg, ts, frozen, tokenizer
        self.model_cfg: FreezeEmpathConfig = ts.model_config
        self.cache_dir = str(cfg.data.get("cache_dir", "") or "")
        self.recipe = PromptRecipe.from_config(cfg.data)

    def replies(self, records: List[dict], with_emotion: bool, batch: int = 32):
        """Self-distillation: the frozen LLM's own greedy reply to the transcript (plus the
        emotion label when `with_emotion`, stage 2b) for records that have none."""
        todo = [r for r in records if r.get("reply_ids") is None and not r.get("reply")]
        if not todo:
            return
        store = self._reply_store()
        # a dual-thinking row's reply follows its analysis: the analysis is part of the key
        # (rows without one keep the keys of earlier caches)
        keys = [json.dumps([r.get("transcript"), r.get("emotion") if with_emotion else None]
                           + ([r["analysis"]] if with_emotion and r.get("analysis") else []))
                for r in todo]
        first: Dict[str, dict] = {}  # one generation per distinct (transcript, emotion)
        for r, k in zip(todo, keys):
            if k not in store:
                first.setdefault(k, r)
        if first:
            self._generate_replies(list(first.values()), with_emotion, batch)
            store.update({k: r["reply_ids"] for k, r in first.items()})
            self._save_reply_store(store)
        for r, k in zip(todo, keys):
            r["reply_ids"] = list(store[k])

    def _reply_file(self) -> Optional[str]:
        if not self.cache_dir:
            return None
        d = self.cfg.data
        # the spec, never the resolved path: the cache survives a moved environment
        source = (model_spec(self.cfg.init.llm or self.cfg.init.freezeempath)
                  or f"seed{self.cfg.train.seed}")
        tag = cache_tag(source, d.chat_template, self.model_cfg.system_prompt,
                        d.target_len, d.teacher_len, d.tokenizer, self.recipe.teacher,
                        self.recipe.teacher_emotion, self.recipe.neutral_plain)
        return os.path.join(self.cache_dir, f"replies-{tag}.json")

    def _reply_store(self) -> Dict[str, list]:
        path = self._reply_file()
        if path and os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        return {}

    def _save_reply_store(self, store: Mapping[str, list]):
        path = self._reply_file()
        if path and jax.process_index() == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(store, f)
            os.replace(path + ".tmp", path)

    def _generate_replies(self, todo: List[dict], with_emotion: bool, batch: int):
        d = self.cfg.data
        prompts = PromptBuilder(self.tok, ChatFormat.named(d.chat_template,
                                                           self.model_cfg.system_prompt), 0, 0)
        log.info("self-distilling %d replies with the frozen LLM", len(todo))
        llm = self.frozen["llm"]
        for i in range(0, len(todo), batch):
            part = todo[i:i + batch]
            rows = []
            for r in part:
                if not r.get("transcript"):
                    raise ValueError(f"record {r.get('id', '?')}: self-distillation needs a "
                                     "transcript")
                emo = r.get("emotion") if with_emotion else None
                row = prompts.text_prompt(self.recipe.teacher_text(r["transcript"], emo)
                                          )[: int(d.teacher_len)]
                if with_emotion and r.get("analysis"):
                    # dual thinking: the teacher's turn opens with the analysis and the
                    # reply it writes after it is the target
                    row = row + self.tok.encode(dual_thinking_prefix(r["analysis"]))
                rows.append(row)
            rows += [rows[-1]] * (batch - len(rows))  # static batch: repeat the last prompt
            # widths bucketed: prompts of every length up to a multiple of PROMPT_BUCKET share
            # one compiled prefill and decode
            ids, mask = left_pad(rows, self.tok.pad_id,
                                 round_up(max(len(r) for r in rows), PROMPT_BUCKET))
            with jax.set_mesh(self.ts.mesh):
                # An explicit mask: the pad id may equal a real token id (SmolLM2: pad = eos).
                out = sampling.generate_text(
                    self.model_cfg.llm, llm, ids, attention_mask=mask,
                    max_new_tokens=int(d.target_len) - 1,
                    eos_token_id=self.tok.eos_id, pad_token_id=self.tok.pad_id)
            for r, toks in zip(part, sampling.strip_after_eos(out, self.tok.eos_id)):
                r["reply_ids"] = [int(t) for t in toks if t != self.tok.pad_id]


# ---------------------------------------------------------------------------------------------
# Synthetic targets (tiny random model and synthetic corpora only)

# Prototype (arousal, valence, dominance) per emotion in [-1, 1], for synthetic corpora.
EMOTION_AVD = {"angry": (0.8, -0.6, 0.6), "surprised": (0.7, 0.2, 0.0),
               "happy": (0.6, 0.8, 0.4), "sad": (-0.6, -0.7, -0.5), "neutral": (0.0, 0.0, 0.0)}


def toy_attributes(records: List[dict], num_attributes: int):
    """Synthetic arousal / valence / dominance targets where a corpus has none: a fixed
    prototype point per emotion (RE-LLM option on synthetic data only)."""
    for r in records:
        if r.get("attributes") is None and r.get("emotion") in EMOTION_AVD:
            r["attributes"] = list(EMOTION_AVD[r["emotion"]][:num_attributes])


def add_analyses(records: List[dict], emotions) -> None:
    """Dual thinking (OSUM-EChat recipe): each record's paralinguistic analysis from its
    labels (emotion, gender, age group, whichever it has), e.g. "(The user sounds like a
    woman, and sad.)"; at chat time the same text is written from the heads' predictions."""
    for r in records:
        emo = r.get("emotion")
        if emo is None and r.get("label") is not None and int(r["label"]) >= 0:
            emo = emotions[int(r["label"])]
        gender, age = r.get("gender") or None, r.get("age_group") or None
        if emo is None and gender is None and age is None:
            continue
        r["analysis"] = paralinguistic_analysis(emo, gender, age)


def voice_genders(records: List[dict]):
    """Speaker-gender labels of synthetic clips from their eSpeak voice (`data.synthetic.
    voice_gender`) where a record has a `voice` and no `gender` (corpora built before the
    plan wrote the field). Real corpora carry `gender` from their own metadata."""
    from freezeempath_jax.data.synthetic import voice_gender

    for r in records:
        if r.get("gender") is None and r.get("voice"):
            r["gender"] = voice_gender(r["voice"])


def toy_units(records: List[dict], unit_vocab_size: int, tokenizer):
    """Toy stage-3 targets for the tiny random test model, where no speech exists: two units
    per reply token (a fixed function of the token, not of any speech), so the speech decoder
    has a learnable mapping. Only for data.kind synthetic / noise; real runs read units from
    the manifest, and the demo's stage 3 encodes emotional TTS renders of each reply with
    its unit codec (`train.speech_targets`)."""
    for r in records:
        if r.get("units") is None:
            ids = r.get("reply_ids") or tokenizer.encode(r.get("reply", ""))
            r["units"] = [(7 * t + k) % unit_vocab_size for t in ids for k in (0, 3)]
