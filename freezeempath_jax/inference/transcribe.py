"""Speech recognition with a Whisper checkpoint: greedy decoding in one jitted
`lax.while_loop`, and the `transcribe` command.

A batch of clips runs as one jitted call: log-mels [B, n_mels, 3000] -> WhisperEncoder ->
decoder prefill over the start-of-transcript sequence (shared by every row, so no padding)
-> one `lax.while_loop` of single-token steps with the KV cache, argmax each step, until
every row has produced <|endoftext|> or `max_new_tokens` is reached. No timestamps
(<|notimestamps|> ends the prompt). Token suppression follows the reference decoders
(CTranslate2 / transformers): the checkpoint's `suppress_ids` are never generated and
`suppress_ids_begin` (blank and end-of-text) not as the first token; without those lists in
the checkpoint nothing is suppressed.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import List, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from tqdm import tqdm

from freezeempath_jax.audio import load_audio, log_mel_spectrogram
from freezeempath_jax.checkpoints.whisper_decoder import WhisperASRInfo, load_whisper
from freezeempath_jax.models.configs import WhisperConfig, WhisperDecoderConfig
from freezeempath_jax.models.whisper import WhisperEncoder
from freezeempath_jax.models.whisper_decoder import WhisperDecoder, init_decoder_cache

log = logging.getLogger(__name__)

SOT, EOT, NO_TIMESTAMPS = "<|startoftranscript|>", "<|endoftext|>", "<|notimestamps|>"
# English-only vocabularies have 51864 ids; multilingual ones add a token (and need the
# language and task tokens in the prompt).
MULTILINGUAL_VOCAB = 51865
SAMPLE_RATE = 16000


@struct.dataclass
class _State:
    step: jax.Array  # int32: tokens produced so far
    tokens: jax.Array  # int32 [B, N]: EOT kept, EOT after it
    done: jax.Array  # bool [B]
    cache: dict


def _bias(ids: Sequence[int], vocab: int) -> np.ndarray:
    b = np.zeros((vocab,), np.float32)
    ids = [i for i in ids if 0 <= i < vocab]
    b[ids] = -np.inf
    return b


@functools.partial(jax.jit, static_argnames=("enc_cfg", "dec_cfg", "max_new_tokens"))
def greedy_decode(enc_cfg: WhisperConfig, dec_cfg: WhisperDecoderConfig, params, mel, prompt,
                  suppress, suppress_begin, eot, *, max_new_tokens: int):
    """Greedy transcription tokens int32 [B, max_new_tokens] (EOT kept, then EOT) and
    lengths [B] (tokens before EOT).

    params: {"encoder", "decoder"}; mel [B, n_mels, frames]; prompt int32 [P] (SOT sequence);
    suppress / suppress_begin: float32 [V] additive biases (0 or -inf); eot: int32 scalar.
    """
    enc = WhisperEncoder(enc_cfg).apply({"params": params["encoder"]}, mel).last_hidden_state
    dec = WhisperDecoder(dec_cfg)
    b, p = mel.shape[0], prompt.shape[0]
    cache = init_decoder_cache(dec_cfg, b, p + max_new_tokens - 1, enc.shape[1])
    out = dec.apply({"params": params["decoder"]}, jnp.broadcast_to(prompt, (b, p)),
                    encoder_states=enc, cache=cache, last_logits_only=True)
    first = jnp.argmax(out.logits[:, -1] + suppress + suppress_begin, -1).astype(jnp.int32)
    tokens = jnp.full((b, max_new_tokens), eot, jnp.int32).at[:, 0].set(first)
    state = _State(jnp.ones((), jnp.int32), tokens, first == eot, out.cache)

    def cond(st: _State):
        return (st.step < max_new_tokens) & ~jnp.all(st.done)

    def body(st: _State) -> _State:
        last = jax.lax.dynamic_slice_in_dim(st.tokens, st.step - 1, 1, axis=1)  # [B, 1]
        o = dec.apply({"params": params["decoder"]}, last, cache=st.cache)
        tok = jnp.argmax(o.logits[:, 0] + suppress, -1).astype(jnp.int32)
        tok = jnp.where(st.done, eot, tok)  # a finished row only pads
        tokens = jax.lax.dynamic_update_slice_in_dim(st.tokens, tok[:, None], st.step, 1)
        return _State(st.step + 1, tokens, st.done | (tok == eot), o.cache)

    final = jax.lax.while_loop(cond, body, state)
    lengths = jnp.argmax(jnp.concatenate(
        [final.tokens, jnp.full((b, 1), eot, jnp.int32)], 1) == eot, axis=1)
    return final.tokens, lengths


class WhisperASR:
    """A Whisper checkpoint ready to transcribe: `asr.transcribe(clips) -> [str]`.

    path: anything `checkpoints.whisper_decoder.load_whisper` reads (Hugging Face directory,
    OpenAI `.pt`, CTranslate2 directory). tokenizer: a `tokenizers.Tokenizer` or a path to a
    `tokenizer.json` (default: the one beside the weights). language: the language token of
    multilingual models ("en" -> <|en|>). batch_size: clips per jitted call (batches are
    padded to it, so one compiled shape serves all).
    """

    def __init__(self, configs, params, info: WhisperASRInfo = WhisperASRInfo(),
                 tokenizer=None, *, language: str = "en", batch_size: int = 8,
                 max_new_tokens: int = 224):
        from tokenizers import Tokenizer

        self.enc_cfg, self.dec_cfg = configs
        self.params = params
        tokenizer = tokenizer or info.tokenizer_file
        if tokenizer is None:
            raise FileNotFoundError("no tokenizer.json beside the Whisper weights; pass "
                                    "tokenizer=")
        self.tokenizer = (Tokenizer.from_file(os.fspath(tokenizer))
                          if isinstance(tokenizer, (str, os.PathLike)) else tokenizer)
        self.prompt = self.sot_sequence(language)
        self.eot = self._id(EOT)
        v = self.dec_cfg.vocab_size
        self.suppress = jnp.asarray(_bias(info.suppress_ids, v))
        self.suppress_begin = jnp.asarray(_bias(info.suppress_ids_begin, v))
        self.batch_size = int(batch_size)
        # the decoder has max_target_positions slots for the prompt and the new tokens
        self.max_new_tokens = int(min(max_new_tokens,
                                      self.dec_cfg.max_target_positions - len(self.prompt)))

    @classmethod
    def load(cls, path, **kwargs) -> "WhisperASR":
        """Reads the weights, tokenizer and suppression lists of a Whisper checkpoint."""
        configs, params, info = load_whisper(path)
        return cls(configs, params, info, **kwargs)

    def _id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"the tokenizer has no {token} token (not a Whisper tokenizer?)")
        return int(i)

    def sot_sequence(self, language: str = "en") -> List[int]:
        """<|startoftranscript|> (+ <|lang|><|transcribe|> when multilingual)
        <|notimestamps|>."""
        ids = [self._id(SOT)]
        if self.dec_cfg.vocab_size >= MULTILINGUAL_VOCAB:
            ids += [self._id(f"<|{language}|>"), self._id("<|transcribe|>")]
        return ids + [self._id(NO_TIMESTAMPS)]

    def mel(self, audio) -> np.ndarray:
        """[n_mels, 3000] features of a 16 kHz clip (a 2-D input is taken as a mel)."""
        a = np.asarray(audio, np.float32)
        if a.ndim == 2:
            return a
        return log_mel_spectrogram(a, self.enc_cfg.n_mels, pad_or_trim_seconds=30.0)

    def token_ids(self, clips: Sequence) -> List[List[int]]:
        """Greedy token ids (before <|endoftext|>) of each clip, in batches."""
        out: List[List[int]] = []
        for start in range(0, len(clips), self.batch_size):
            part = [self.mel(c) for c in clips[start:start + self.batch_size]]
            n = len(part)
            part += [part[0]] * (self.batch_size - n)
            toks, lens = greedy_decode(
                self.enc_cfg, self.dec_cfg, self.params, jnp.asarray(np.stack(part)),
                jnp.asarray(self.prompt, jnp.int32), self.suppress, self.suppress_begin,
                jnp.int32(self.eot), max_new_tokens=self.max_new_tokens)
            toks, lens = np.asarray(toks), np.asarray(lens)
            out += [toks[i, :lens[i]].tolist() for i in range(n)]
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (special tokens dropped, outer spaces stripped)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def transcribe(self, clips: Sequence) -> List[str]:
        """Transcripts of 16 kHz float clips (or log-mels)."""
        return [self.decode(ids) for ids in self.token_ids(clips)]


def run_transcribe(model, input_path: str, output_path: str, *, batch_size: int = 8,
                   language: str = "en", max_seconds: float = 30.0,
                   progress: bool = True) -> int:
    """Transcribes one audio file or a JSONL manifest (`{"id", "audio"}` lines, as `chat`
    reads them) into `output_path` (JSONL: `id`, `audio`, `text`; a bad item gets `error`
    and the rest go on). model: a Whisper checkpoint path or a `WhisperASR`. Returns the
    number of failed items."""
    from freezeempath_jax.inference.cli import read_items

    asr = model if isinstance(model, WhisperASR) else WhisperASR.load(
        model, batch_size=batch_size, language=language)
    items = read_items(input_path)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)) or ".", exist_ok=True)
    failed = 0
    with open(output_path, "w") as out, tqdm(total=len(items), desc="transcribe", unit="clip",
                                             disable=not progress) as bar:
        for start in range(0, len(items), asr.batch_size):
            batch = items[start:start + asr.batch_size]
            good, clips = [], []
            for it in batch:
                if "error" in it:
                    continue
                try:
                    a = load_audio(it["audio"])
                    if len(a) == 0:
                        raise ValueError(f"audio file {it['audio']!r} is empty")
                    if len(a) > max_seconds * SAMPLE_RATE:
                        raise ValueError(f"audio file {it['audio']!r} lasts "
                                         f"{len(a) / SAMPLE_RATE:.1f} s, over {max_seconds} s")
                    clips.append(a)
                    good.append(it)
                except Exception as e:  # a bad clip is reported, the rest go on
                    it["error"] = f"{type(e).__name__}: {e}"
            texts = asr.transcribe(clips) if clips else []
            done = {id(it): t for it, t in zip(good, texts)}
            for it in batch:
                rec = {"id": it["id"], "audio": it.get("shown_audio", it["audio"])}
                if "error" in it:
                    rec["error"] = it["error"]
                    failed += 1
                else:
                    rec["text"] = done[id(it)]
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            out.flush()
            bar.update(len(batch))
    return failed


__all__ = ["WhisperASR", "greedy_decode", "run_transcribe", "MULTILINGUAL_VOCAB"]
