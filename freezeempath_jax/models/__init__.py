"""Flax (linen) modules of every FreezeEmpath component, one file each, and their configs."""

from freezeempath_jax.models.adapters import ConvAdapter, FrameConcatProjector, make_projector
from freezeempath_jax.models.causal_lm import CausalLM, LMOutput, init_cache
from freezeempath_jax.models.configs import (EMOTIONS, EmotionConfig, FreezeEmpathConfig,
                                             LMConfig, ProjectorConfig, SpeechDecoderConfig,
                                             WhisperConfig, WhisperDecoderConfig, from_dict,
                                             to_dict)
from freezeempath_jax.models.emotion import EmotionExtractor, EmotionOutput
from freezeempath_jax.models.freezeempath import FreezeEmpath, FreezeEmpathOutput, splice
from freezeempath_jax.models.speech_decoder import SpeechDecoder
from freezeempath_jax.models.whisper import WhisperEncoder, WhisperOutput
from freezeempath_jax.models.whisper_decoder import (DecoderOutput, WhisperDecoder,
                                                      init_decoder_cache)

__all__ = [
    "ConvAdapter", "FrameConcatProjector", "make_projector", "CausalLM", "LMOutput",
    "init_cache", "EMOTIONS", "EmotionConfig", "FreezeEmpathConfig", "LMConfig",
    "ProjectorConfig", "SpeechDecoderConfig", "WhisperConfig", "from_dict", "to_dict",
    "EmotionExtractor", "EmotionOutput", "FreezeEmpath", "FreezeEmpathOutput", "splice",
    "SpeechDecoder", "WhisperEncoder", "WhisperOutput", "WhisperDecoder",
    "WhisperDecoderConfig", "DecoderOutput", "init_decoder_cache",
]

# units-to-waveform decoder (the release's IndexTTS2-derived vocoder chain)
from freezeempath_jax.models.bigvgan import BigVGAN  # noqa: E402
from freezeempath_jax.models.dit import DiT  # noqa: E402
from freezeempath_jax.models.length_regulator import LengthRegulator  # noqa: E402
from freezeempath_jax.models.semantic_codec import SemanticCodebook  # noqa: E402
from freezeempath_jax.models.unit_decoder import decode_units, stream_units  # noqa: E402
from freezeempath_jax.models.configs import (BigVGANConfig, DiTConfig,  # noqa: E402
                                             LengthRegulatorConfig, SemanticCodecConfig,
                                             UnitDecoderConfig)

__all__ += ["BigVGAN", "DiT", "LengthRegulator", "SemanticCodebook", "decode_units",
            "stream_units", "BigVGANConfig", "DiTConfig", "LengthRegulatorConfig",
            "SemanticCodecConfig", "UnitDecoderConfig"]

# the CPU demo's own unit codec (speech <-> 50 Hz units, fitted on its corpus)
from freezeempath_jax.models.configs import UnitCodecConfig  # noqa: E402
from freezeempath_jax.models.unit_codec import UnitCodec  # noqa: E402

__all__ += ["UnitCodec", "UnitCodecConfig"]
