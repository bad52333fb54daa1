"""Audio features of training records: log-mels, or cached frozen-encoder outputs."""

from __future__ import annotations

import hashlib
import json
import os
from typing import List, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from freezeempath_jax import params as P_
from freezeempath_jax.audio import load_audio, log_mel_spectrogram
from freezeempath_jax.models.configs import FreezeEmpathConfig, to_dict
from freezeempath_jax.models.freezeempath import FreezeEmpath
from freezeempath_jax.real_models import model_spec
from freezeempath_jax.train.step import TrainStep


def cache_tag(*parts) -> str:
    """Short hash naming a cache entry by everything its content depends on."""
    blob = json.dumps([str(p) for p in parts], sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


class FeatureMaker:
    """Adds audio features to raw records: log-mel spectrograms, or (`data.cache_encoder`)
    the frozen Whisper encoder's outputs, computed once per clip and kept on disk under
    `data.cache_dir` so later stages and runs skip the encoder."""

    def __init__(self, cfg, ts: TrainStep, frozen):
        self.cfg, self.ts, self.frozen = cfg, ts, frozen
        self.model_cfg: FreezeEmpathConfig = ts.model_config
        self._encode = None
        self.cache_dir = str(cfg.data.get("cache_dir", "") or "")

    def _encoder_cache_file(self, rec: Mapping) -> Optional[str]:
        """Where the frozen encoder's outputs for `rec` live on disk (None: no disk cache,
        or a record without a stable identity)."""
        if not self.cache_dir or not isinstance(rec.get("audio"), (str, os.PathLike)):
            return None
        # the spec, never the resolved path: the cache survives a moved environment
        source = (model_spec(self.cfg.init.whisper or self.cfg.init.freezeempath)
                  or f"seed{self.cfg.train.seed}")
        folder = "encoder-" + cache_tag(source, to_dict(self.model_cfg.whisper),
                                              self.cfg.data.audio_seconds)
        return os.path.join(self.cache_dir, folder,
                            cache_tag(os.path.abspath(rec["audio"]), rec.get("id")) + ".npz")

    def mel(self, rec: Mapping) -> np.ndarray:
        audio = rec["audio"]
        if isinstance(audio, (str, os.PathLike)):
            audio = load_audio(audio)
        secs = float(self.cfg.data.audio_seconds)
        return log_mel_spectrogram(np.asarray(audio, np.float32), self.model_cfg.whisper.n_mels,
                                   pad_or_trim_seconds=secs)

    def features(self, records: Sequence[Mapping]) -> List[dict]:
        out = []
        for rec in records:
            r = dict(rec)
            cached = (self._encoder_cache_file(r) if self.cfg.data.cache_encoder and
                      "encoder_last" not in r else None)
            if cached and os.path.exists(cached):
                with np.load(cached) as z:
                    r["encoder_last"], r["encoder_layers"] = z["last"], z["layers"]
            if "mel" not in r and "encoder_last" not in r:
                if "audio" not in r:
                    raise ValueError(f"record {r.get('id', '?')} has no audio, mel or "
                                     "encoder_last")
                r["mel"] = self.mel(r)
            out.append(r)
        if self.cfg.data.cache_encoder:
            self._cache_encoder([r for r in out if "encoder_last" not in r])
        return out

    def _cache_encoder(self, recs: List[dict], chunk: int = 16):
        """Runs the frozen encoder once per clip; training then reads its outputs."""
        if not recs:
            return
        if "whisper" not in self.frozen:
            raise ValueError("data.cache_encoder needs a frozen Whisper encoder, but the "
                             "trainable table trains part of it")
        if any(p.startswith("whisper/") for p in P_.flatten_with_paths(self.ts.abstract_state
                                                                     .params)):
            raise ValueError("data.cache_encoder: the encoder is (partly) trainable")
        if self._encode is None:
            model = self.ts.model

            def enc(whisper, mel):
                last, layers = model.apply({"params": {"whisper": whisper}}, mel,
                                           method=FreezeEmpath.encode_audio)
                return last.astype(jnp.float32), jnp.swapaxes(layers, 0, 1).astype(jnp.float32)
            self._encode = jax.jit(enc)
        whisper = self.frozen["whisper"]
        for i in range(0, len(recs), chunk):
            part = recs[i:i + chunk]
            mel = np.stack([r["mel"] for r in part])
            pad = chunk - len(part)
            if pad:  # one compiled shape
                mel = np.concatenate([mel, np.zeros((pad,) + mel.shape[1:], mel.dtype)])
            with jax.set_mesh(self.ts.mesh):
                last, layers = jax.device_get(self._encode(whisper, jnp.asarray(mel)))
            for j, r in enumerate(part):
                r["encoder_last"], r["encoder_layers"] = last[j], layers[j]
                del r["mel"]
                path = self._encoder_cache_file(r)
                if path and jax.process_index() == 0:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    tmp = path + ".tmp.npz"  # atomic: a killed run never leaves half a file
                    np.savez(tmp, last=last[j], layers=layers[j])
                    os.replace(tmp, path)
