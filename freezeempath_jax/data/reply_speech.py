"""Stage 3's emotional TTS: each reply rendered by eSpeak NG in a speaking style chosen from
the *user's* emotion (the paper's style prompt per emotion; DESIGN.md section 10's judge
criteria: happy -> cheerful, sad -> gentle and comforting, angry -> empathetic and calm).

One fixed reply voice (the release speaks with one voice too); the style sets eSpeak's pitch
(0-100), pitch range (0-100), rate (words per minute) and volume (0-200):

    user sounds   reply style            pitch  range  rate  volume
    sad           gentle, slow, low        22     25    125     80
    angry         calm, steady             38     15    150     85
    happy         cheerful, high, quick    72     70    195    110
    surprised     lively, wide             64     90    180    105
    neutral       plain                    48     40    165     95

Renders are deterministic (no jitter, no noise): the speech decoder learns one rendering per
(reply, emotion).
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from freezeempath_jax.data import synthetic

REPLY_VOICE = "en-us"
# (pitch, range, rate, volume) of the reply, by the user's emotion
REPLY_STYLES: Dict[str, Tuple[int, int, int, int]] = {
    "sad": (22, 25, 125, 80),
    "angry": (38, 15, 150, 85),
    "happy": (72, 70, 195, 110),
    "surprised": (64, 90, 180, 105),
    "neutral": (48, 40, 165, 95),
}
LEAD_SECONDS = 0.04  # silence before the reply (eSpeak starts at once)


def render_reply(text: str, user_emotion: str, voice: str = REPLY_VOICE,
                 with_words: bool = False):
    """16 kHz float32 speech of a reply `text` in the style for a user who sounds
    `user_emotion` (see the module docstring). ValueError for empty text or an unknown
    emotion. With `with_words`, returns (audio, words): each spoken word as (the index in
    `text` just past it and its attached punctuation, its start in seconds in the returned
    audio), from eSpeak's word events; stage 3 reads them to align the reply's tokens with its
    units."""
    if user_emotion not in REPLY_STYLES:
        raise ValueError(f"unknown emotion {user_emotion!r}; expected one of "
                         f"{sorted(REPLY_STYLES)}")
    if not text or not text.strip():
        raise ValueError("render_reply needs non-empty text")
    pitch, prange, rate, volume = REPLY_STYLES[user_emotion]
    raw, spoken = synthetic.render_espeak(text, voice, pitch=pitch, pitch_range=prange,
                                          rate=rate, volume=volume, with_words=True)
    audio = synthetic._resample(raw, synthetic._SERVER.sample_rate)
    lead = np.zeros(int(LEAD_SECONDS * synthetic.SAMPLING_RATE), np.float32)
    audio = np.clip(np.concatenate([lead, audio.astype(np.float32)]), -1.0, 1.0)
    if not with_words:
        return audio
    # eSpeak's event may cover only part of a written word ("I" of "I'm", "Let" of "Let's"):
    # a word ends at the next space, so its suffix and punctuation count as part of it.
    return audio, [(_word_end(text, end), LEAD_SECONDS + start) for _, start, end in spoken]


def _word_end(text: str, end: int) -> int:
    while end < len(text) and not text[end].isspace():
        end += 1
    return end
