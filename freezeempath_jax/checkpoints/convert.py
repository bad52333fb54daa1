"""`convert`: any checkpoint users hold (Whisper, causal LM, FreezeEmpath release) -> this
project's format (`checkpoints.formats`); `freezeempath-jax convert --kind K --from PATH --out
DIR` calls it."""

from __future__ import annotations

import os
from typing import Optional

import jax.numpy as jnp

from freezeempath_jax.checkpoints.causal_lm import find_gguf, load_causal_lm
from freezeempath_jax.checkpoints.formats import KINDS, TOKENIZER_DIR
from freezeempath_jax.checkpoints.gguf_io import GGUFSource
from freezeempath_jax.checkpoints.orbax_io import save_params
from freezeempath_jax.checkpoints.release import load_freezeempath
from freezeempath_jax.checkpoints.unit_decoder import load_unit_decoder
from freezeempath_jax.checkpoints.whisper import load_whisper_encoder
# the module, not its names: the checkpoints package may be initialised while `text.tokenizers`
# is still being imported (it reads `checkpoints.errors`), and names are only read at call time
from freezeempath_jax.text import tokenizers as tk


def convert(kind: str, src: str, out_dir: str, dtype=None, *, whisper: Optional[str] = None,
            frozen_dtype=None, tokenizer: Optional[str] = None, overwrite: bool = False) -> str:
    """Converts a checkpoint of `kind` ("whisper", "llm", "freezeempath" or "unit_decoder",
    the release's units-to-waveform folder) at `src` into our format under `out_dir` and
    returns `out_dir`.

    dtype: parameter dtype (default float32; for "freezeempath" the trainable parts, with
    `frozen_dtype` for the Whisper encoder and LLM, bf16 by default).
    whisper: the Whisper checkpoint for a release without the encoder inside.
    tokenizer: a tokenizer directory or .gguf to save beside the weights (default: the one in
    `src` when there is one).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {sorted(KINDS)}")
    dtype = jnp.float32 if dtype is None else dtype
    if kind == "whisper":
        config, params = load_whisper_encoder(src, dtype)
    elif kind == "llm":
        config, params = load_causal_lm(src, dtype)
    elif kind == "unit_decoder":
        config, params = load_unit_decoder(src, dtype)
    else:
        config, params = load_freezeempath(
            src, whisper=whisper, dtype=dtype,
            frozen_dtype=jnp.bfloat16 if frozen_dtype is None else frozen_dtype)
    save_params(out_dir, params, config=config, kind=kind, overwrite=overwrite,
                extra={"source": os.path.abspath(os.fspath(src))})
    if tokenizer is None and kind not in ("whisper", "unit_decoder"):
        if tk.has_tokenizer(src):
            tokenizer = src
        elif kind == "llm" and find_gguf(src) and _gguf_has_tokenizer(find_gguf(src)):
            # weights-only GGUF exports exist; their weights still convert, without tokenizer
            tokenizer = find_gguf(src)
    if tokenizer is not None:
        tk.load_tokenizer(tokenizer).save_pretrained(os.path.join(out_dir, TOKENIZER_DIR))
    return out_dir


def _gguf_has_tokenizer(path: str) -> bool:
    """Whether a GGUF file carries llama.cpp tokenizer metadata (`tokenizer.ggml.model`)."""
    return GGUFSource(path).field("tokenizer.ggml.model") is not None
