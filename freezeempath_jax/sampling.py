"""Public name kept from DESIGN.md section 8: `freezeempath_jax.sampling.generate_text`.
Generation lives in `freezeempath_jax.inference.sampling`; this module re-exports its API."""

from freezeempath_jax.inference.sampling import (DecodeState, GenerateOutput, SamplingConfig,
                                                 generate_from_embeds, generate_text,
                                                 sample_logits, strip_after_eos)

__all__ = ["DecodeState", "GenerateOutput", "SamplingConfig", "generate_from_embeds",
           "generate_text", "sample_logits", "strip_after_eos"]
