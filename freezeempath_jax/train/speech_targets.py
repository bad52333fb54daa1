"""Stage 3 data recipe (the paper's stage 3a on the demo's own codec):

1. the trained chat model answers each training clip greedily, as it will at inference, and
   the frozen LLM's state before every reply token (h_{t-1}) is kept: the hidden states are
   cached once, so stage 3 never runs the LLM (no forward, no backward) while it trains;
2. every reply is rendered by the emotional TTS (`data.reply_speech`: the style follows the
   user's emotion label);
3. the unit codec (`models.unit_codec`) is fitted on the training renders (or given) and
   encodes every render to 50 Hz units;
4. eSpeak's word timings give, for each reply token, the unit where the speech of the words
   its text completes ends (`token_unit_ends`): the aligned chunks of
   `models.streaming.aligned_layout_order`, so each text chunk is followed by its own speech.

The records that come out carry `reply_ids`, `units`, `token_unit_ends` and
`llm_hidden_prev`, which the trainer's stage-3 batches read as they are (`BatchBuilder` puts
`llm_hidden_prev` in the batch; `TrainStep` then skips the LLM).
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
                        batch_size: int = 8, temperature: float = 0.0, seed: int = 0):
    """Replies of `chat_model` to each clip (greedy at temperature 0, else sampled with
    `seed`) and the LLM state that produced each reply token:
    [(reply ids without EOS, hidden [len, H] float32)]."""
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
            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + s,
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


def token_char_ends(codec, ids: Sequence[int]) -> List[int]:
    """For each token of a reply, the length of the reply text (`decode(ids).strip()`, the
    text the TTS reads) up to and including it."""
    full = codec.decode(list(ids))
    lead = len(full) - len(full.lstrip())
    return [max(0, len(codec.decode(list(ids[:i + 1]))) - lead) for i in range(len(ids))]


def token_unit_ends(char_ends: Sequence[int], words: Sequence[tuple], num_units: int,
                    units_per_second: float) -> List[int]:
    """For each token, the unit where the speech of every word its text completes ends: the
    start of the first word not yet complete (a word is complete once the text reaches its
    end), or `num_units` when every word is. words: (character end, start seconds) in order
    (`render_reply(..., with_words=True)`). Non-decreasing."""
    out, w = [], 0
    for end in char_ends:
        while w < len(words) and words[w][0] <= end:
            w += 1
        u = num_units if w == len(words) else int(round(words[w][1] * units_per_second))
        out.append(min(max(u, out[-1] if out else 0), num_units))
    return out


def stage3_records(chat_model, records: List[dict], clips: Sequence[np.ndarray], *,
                   max_new_tokens: int, codec_config=None, codec_params=None,
                   max_units: Optional[int] = None, batch_size: int = 8, seed: int = 0,
                   samples: int = 1, sample_temperature: float = 0.8):
    """Records ready for stage 3 and the codec they were encoded with.

    records: one dict per clip with at least `id` and `emotion` (the user's emotion, which
    picks the reply style). Each clip is answered greedily (as `chat` answers) and, with
    `samples` > 1, `samples - 1` more times at `sample_temperature` (seeds from `seed`): more
    distinct sentences for the speech decoder from the same clips, each with the LLM states
    that really produced it; a sampled reply equal to one already kept for the clip is
    dropped, and extra ones get ids `<id>#s<k>`. codec_params None: the codec
    (`codec_config`) is fitted on these renders. Records whose reply is empty are dropped
    (nothing to speak). Returns (records with reply_ids / reply / units / token_unit_ends /
    llm_hidden_prev / reply_audio_seconds, (codec config, codec params), reply audio per kept
    record)."""
    if samples < 1:
        raise ValueError(f"stage3_records: samples must be >= 1, got {samples}")
    passes = []
    for k in range(samples):
        passes.append(replies_with_hidden(
            chat_model, clips, max_new_tokens=max_new_tokens, batch_size=batch_size,
            temperature=0.0 if k == 0 else sample_temperature, seed=seed + 1000 * k))
    kept, audios, timings = [], [], []
    for i, rec in enumerate(records):
        seen = set()
        for k, replies in enumerate(passes):
            ids, hid = replies[i]
            rid = rec.get("id") if k == 0 else f"{rec.get('id')}#s{k}"
            text = chat_model.codec.decode(ids).strip()
            if not ids or not text:
                log.warning("stage 3: record %s has an empty reply; skipped", rid)
                continue
            if tuple(ids) in seen:
                continue
            seen.add(tuple(ids))
            audio, words = render_reply(text, rec["emotion"], with_words=True)
            kept.append(dict(rec, id=rid, reply_ids=list(ids), reply=text, llm_hidden_prev=hid,
                             reply_audio_seconds=len(audio) / 16000.0))
            audios.append(audio)
            timings.append((token_char_ends(chat_model.codec, ids), words))
    if codec_params is None:
        codec_params = unit_codec.fit(codec_config, audios, seed=seed)
    units = unit_codec.encode_audio(codec_config, codec_params, audios)
    rate = codec_config.sampling_rate / unit_codec.samples_per_unit(codec_config)
    for rec, u, (char_ends, words) in zip(kept, units, timings):
        rec["units"] = [int(x) for x in (u if max_units is None else u[:max_units])]
        rec["token_unit_ends"] = token_unit_ends(char_ends, words, len(rec["units"]), rate)
    return kept, (codec_config, codec_params), audios
