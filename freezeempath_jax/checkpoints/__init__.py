"""Loading the weights users hold (Hugging Face, OpenAI-whisper, CTranslate2, GGUF, the
FreezeEmpath release) into our parameter trees, and saving our own (orbax).

Every loader returns `(config, params)`, takes `dtype=` for the returned parameters and
`shardings=` / `mesh=` to place each leaf as soon as it is built, and raises one
`CheckpointError` listing every missing, unexpected or mis-shaped key.
"""

from freezeempath_jax.checkpoints.causal_lm import load_causal_lm
from freezeempath_jax.checkpoints.ctranslate2_io import CTranslate2Source, write_model_bin
from freezeempath_jax.checkpoints.errors import CheckpointError, Problem
from freezeempath_jax.checkpoints.convert import convert
from freezeempath_jax.checkpoints.formats import converted_kind, load_config, save_config
from freezeempath_jax.checkpoints.orbax_io import (load_converted, merge_params, restore_params,
                                                   save_params)
from freezeempath_jax.checkpoints.release import load_freezeempath, parse_stream_params
from freezeempath_jax.checkpoints.workdir import load_trained_params
# tokenizers live in `freezeempath_jax.text`; load_tokenizer stays reachable here too
from freezeempath_jax.text.tokenizers import load_tokenizer
from freezeempath_jax.checkpoints.whisper import load_whisper_encoder, save_whisper_encoder_ct2
from freezeempath_jax.checkpoints.whisper_decoder import load_whisper, load_whisper_decoder

__all__ = [
    "CheckpointError", "Problem", "load_whisper_encoder", "load_causal_lm", "load_freezeempath",
    "parse_stream_params", "save_params", "restore_params", "save_config", "load_config",
    "load_converted", "merge_params", "convert", "converted_kind", "load_tokenizer",
    "load_trained_params", "CTranslate2Source", "write_model_bin",
    "save_whisper_encoder_ct2", "load_whisper", "load_whisper_decoder",
]

# units-to-waveform decoder
from freezeempath_jax.checkpoints.bigvgan import load_bigvgan  # noqa: E402
from freezeempath_jax.checkpoints.unit_decoder import load_unit_decoder  # noqa: E402

__all__ += ["load_bigvgan", "load_unit_decoder"]
