"""The units-to-waveform side of chat, whichever decoder a model speaks with: the release's
IndexTTS2-derived decoder (`models.unit_decoder`, 22,050 Hz) or the demo's unit codec
(`models.unit_codec`, 16 kHz). `Voice` checks units (empty or out of range -> ValueError
for that utterance), decodes them whole or chunk by chunk as they stream.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np

from freezeempath_jax.models import unit_codec
from freezeempath_jax.models.configs import UnitCodecConfig
from freezeempath_jax.models.unit_decoder import decode_units as release_decode


class Voice:
    """decoder: (config, params) of either decoder kind."""

    def __init__(self, decoder):
        self.config, self.params = decoder
        self.is_codec = isinstance(self.config, UnitCodecConfig)

    @property
    def sampling_rate(self) -> int:
        c = self.config
        return int(c.sampling_rate if self.is_codec else c.bigvgan.sampling_rate)

    @property
    def vocab_size(self) -> int:
        c = self.config
        return int(c.codebook_size if self.is_codec else c.codec.codebook_size)

    def check(self, units) -> np.ndarray:
        """Units as int64 [T]; ValueError naming the problem (none, empty, out of range)."""
        if units is None:
            raise ValueError("the model has no speech decoder: it produced no units to speak")
        u = np.asarray(units, np.int64).reshape(-1)
        if u.size == 0:
            raise ValueError("the reply has no speech units (empty): nothing to speak")
        k = self.vocab_size
        bad = u[(u < 0) | (u >= k)]
        if bad.size:
            raise ValueError(f"speech units {bad[:5].tolist()} are outside the decoder's "
                             f"codebook [0, {k})")
        return u

    def decode(self, units, seed: int = 0) -> np.ndarray:
        """One utterance's units -> float32 waveform in [-1, 1] (pure in units and seed)."""
        u = self.check(units)
        if self.is_codec:
            return unit_codec.decode_units(self.config, self.params, [u], seed=seed)[0]
        return release_decode(self.config, self.params, [u], seed=seed)[0]

    def stream(self, unit_chunks: Iterable[Sequence[int]], seed: int = 0,
               chunk_units: int = 25) -> Iterator[np.ndarray]:
        """Audio chunks as units arrive: units are gathered until `chunk_units` are at hand
        (the last chunk takes what is left), each gathered chunk decoded on its own and
        yielded at once."""
        buf, k = [], 0
        for part in unit_chunks:
            buf.extend(int(x) for x in part)
            while len(buf) >= chunk_units:
                chunk, buf = buf[:chunk_units], buf[chunk_units:]
                yield self._chunk(chunk, seed, k)
                k += 1
        if buf:
            yield self._chunk(buf, seed, k)

    def _chunk(self, chunk, seed: int, k: int) -> np.ndarray:
        u = self.check(chunk)
        if self.is_codec:
            return unit_codec.decode_units(self.config, self.params, [u], seed=seed,
                                           first_index=k)[0]
        return release_decode(self.config, self.params, [u], seed=seed + k)[0]
