"""The codebook side of MaskGCT's semantic codec (Amphion RepCodec): unit ids -> features.

The decoder needs only `quantizer.vq2emb`: look each id up in the 8-dim codebook (raw rows;
the L2 normalisation is used only when encoding) and project to the 1024-dim feature space
with the weight-normed 1x1 `out_project` conv (folded into a plain kernel when loading).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from freezeempath_jax.models.configs import SemanticCodecConfig, to_dtype


class SemanticCodebook(nn.Module):
    """`apply({"params": p}, ids [B, T]) -> [B, T, hidden_size]` (RepCodec's vq2emb, time
    major; the reference returns [B, hidden_size, T])."""

    config: SemanticCodecConfig

    @nn.compact
    def __call__(self, ids):
        c = self.config
        dt = to_dtype(c.dtype)
        codebook = self.param("codebook", nn.initializers.normal(1.0),
                              (c.codebook_size, c.codebook_dim), jnp.float32)
        kernel = self.param("out_project_kernel", nn.initializers.lecun_normal(),
                            (c.codebook_dim, c.hidden_size), jnp.float32)
        bias = self.param("out_project_bias", nn.initializers.zeros, (c.hidden_size,),
                          jnp.float32)
        e = jnp.take(codebook, ids, axis=0).astype(dt)  # [B, T, codebook_dim]
        return jnp.einsum("btc,cd->btd", e, kernel.astype(dt)) + bias.astype(dt)
