"""Stage 3 data recipe (the paper's stage 3a on the demo's own codec):

1. the trained chat model answers each training clip greedily, as it will at inference, and
   the frozen LLM's state before every reply token (h_{t-1}) is kept: the hidden states are
   cached once, so stage 3 never runs the LLM (no forward, no backward) while it trains;
2. every reply is rendered by the emotional TTS (`data.reply_speech`: the style follows the
   user's emotion label);
3. the unit codec (`models.unit_codec`) is fitted on the training renders (or given) and
   encodes every render to 50 Hz units.

The records that come out carry `reply_ids`, `units` and `llm_hidden_prev`, which the
trainer's stage-3 batches read as they are (`BatchBuilder` puts `llm_hidden_prev` in the
batch; `TrainStep` then skips the LLM).
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from freezeempath_jax.data.reply_speech import render_reply
from freezeempath_jax.inference import sampling as sampling_lib
from freezeempath_jax.models import unit_codec

log = logging.getLogger("freezeempath_jax.train")


def replies_with_hidden(chat_model, clips: Sequence[np.ndarray], *, max_new_tokens: int,
                        batch_size: int = 8):
    """Greedy replies of `chat_model` to each clip and the LLM state that produced each reply
    token: [(reply ids without EOS, hidden [len, H] float32)]."""
    c = chat_model.config
    eos = set(chat_model.codec.eos_ids if isinstance(chat_model.codec.eos_ids, (list, tuple))
              else [chat_model.codec.eos_ids])
    out = []
    for s in range(0, len(clips), batch_size):
        part = list(clips[s:s + batch_size])
        enc = chat_model.encode(part, batch_size)
        prompts = chat_model.build_prompts(enc, None, len(part), max_new_tokens)
        embeds = chat_model._embed(chat_model.params, jnp.asarray(prompts.ids),
                                   jnp.asarray(prompts.speech), jnp.asarray(prompts.emotion))
        gen = sampling_lib.generate_from_embeds(
            c.llm, chat_model.params["llm"], embeds, prompts.mask, keep_hidden=True,
            max_new_tokens=max_new_tokens, temperature=0.0,
            eos_token_id=chat_model.codec.eos_ids, pad_token_id=chat_model.codec.pad_id)
        toks, lens = np.asarray(gen.tokens), np.asarray(gen.lengths)
        hid = np.asarray(jax.device_get(gen.hidden), np.float32)
        for i in range(len(part)):
            ids = toks[i, :lens[i]].tolist()
            n = len(ids)
            while n and ids[n - 1] in eos:
                n -= 1
            out.append((ids[:n], hid[i, :n]))
    return out


def stage3_records(chat_model, records: List[dict], clips: Sequence[np.ndarray], *,
                   max_new_tokens: int, codec_config=None, codec_params=None,
                   max_units: Optional[int] = None, batch_size: int = 8, seed: int = 0):
    """Records ready for stage 3 and the codec they were encoded with.

    records: one dict per clip with at least `id` and `emotion` (the user's emotion, which
    picks the reply style). codec_params None: the codec (`codec_config`) is fitted on these
    renders. Records whose reply is empty are dropped (nothing to speak). Returns
    (records with reply_ids / reply / units / llm_hidden_prev / reply_audio_seconds,
    (codec config, codec params), reply audio per kept record)."""
    replies = replies_with_hidden(chat_model, clips, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size)
    kept, audios = [], []
    for rec, (ids, hid) in zip(records, replies):
        text = chat_model.codec.decode(ids).strip()
        if not ids or not text:
            log.warning("stage 3: record %s has an empty reply; skipped", rec.get("id"))
            continue
        audio = render_reply(text, rec["emotion"])
        kept.append(dict(rec, reply_ids=list(ids), reply=text, llm_hidden_prev=hid,
                         reply_audio_seconds=len(audio) / 16000.0))
        audios.append(audio)
    if codec_params is None:
        codec_params = unit_codec.fit(codec_config, audios, seed=seed)
    units = unit_codec.encode_audio(codec_config, codec_params, audios)
    for rec, u in zip(kept, units):
        rec["units"] = [int(x) for x in (u if max_units is None else u[:max_units])]
    return kept, (codec_config, codec_params), audios
