"""Speech decoder ("speech generator"): a small causal LM that reads the frozen LLM's reply
(hidden states fused with the reply's token embeddings) and writes speech unit tokens, in the
streaming (N, M) layout of `freezeempath_jax.models.streaming`.

Vocabulary of the small LM: the LLM's text vocabulary, `<sep>` (`sep_token_id`) and one token
per speech unit (`unit_offset + u`); EOS is `eos_token_id`.

Parameters (docs/params.md): `lm/...` (a CausalLM), `input_proj/linear` or
`input_proj/fc1` + `input_proj/fc2`, and `gate` with gate fusion. Initialise with
`method=SpeechDecoder.unit_loss` (or any method that reaches every part): `__call__` alone only
touches `lm`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from freezeempath_jax.models import streaming
from freezeempath_jax.models.causal_lm import CausalLM
from freezeempath_jax.models.configs import SpeechDecoderConfig, to_dtype
from freezeempath_jax.models.layers import Dense
from freezeempath_jax.sharding import constrain

BTE = ("activation_batch", "activation_length", "activation_embed")


@struct.dataclass
class UnitLossOutput:
    token_loss: jax.Array  # [B, S] float32 cross-entropy, 0 where loss_mask is 0
    loss_mask: jax.Array  # [B, S] float32, 1 where the next token is a unit / EOS
    loss: jax.Array  # scalar: sum(token_loss) / max(sum(loss_mask), 1) (HF-style token mean)
    num_tokens: jax.Array  # scalar float32: sum(loss_mask)


class InputProjection(nn.Module):
    """LLM hidden [.., H_llm] -> decoder width [.., h]: `linear`, or `fc1` -> ReLU -> `fc2`."""

    proj_type: str
    ffn_dim: int
    out_dim: int
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    @nn.compact
    def __call__(self, x):
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.proj_type == "linear":
            return Dense((self.out_dim,), ("embed", "adapter_hidden"), name="linear",
                         **common)(x)
        if self.proj_type == "ffn":
            h = Dense((self.ffn_dim,), ("embed", "adapter_hidden"), name="fc1", **common)(x)
            return Dense((self.out_dim,), ("adapter_hidden", "embed"), name="fc2",
                         **common)(nn.relu(h))
        raise ValueError(f"SpeechDecoderConfig.proj_type {self.proj_type!r} is unknown; "
                         "choose 'linear' or 'ffn'")


class SpeechDecoder(nn.Module):
    """Small causal LM over fused LLM states, `<sep>`, unit tokens and EOS.

    Methods: `fuse` (text-side inputs), `embed_units`, `sep_embedding`, `eos_embedding`,
    `__call__` (the LM on input embeddings, with an optional KV cache) and `unit_loss`
    (training forward over a `streaming.StreamLayout`).
    """

    config: SpeechDecoderConfig
    llm_hidden: int  # width H of the frozen LLM whose states are read

    def setup(self):
        c = self.config
        v = c.lm.vocab_size
        if c.proj_type not in ("linear", "ffn"):
            raise ValueError(f"SpeechDecoderConfig.proj_type {c.proj_type!r} is unknown; "
                             "choose 'linear' or 'ffn'")
        if c.gate_fusion and not c.add_token_embeddings:
            raise ValueError("SpeechDecoderConfig.gate_fusion needs add_token_embeddings=True "
                             "(the gate mixes projected states with token embeddings)")
        if not (0 <= c.unit_offset and c.unit_offset + c.unit_vocab_size <= v):
            raise ValueError(f"SpeechDecoderConfig: units occupy ids [{c.unit_offset}, "
                             f"{c.unit_offset + c.unit_vocab_size}) but lm.vocab_size is {v}")
        for name in ("sep_token_id", "eos_token_id"):
            if not 0 <= getattr(c, name) < v:
                raise ValueError(f"SpeechDecoderConfig.{name}={getattr(c, name)} is outside "
                                 f"the decoder vocabulary of {v}")
        self.lm = CausalLM(c.lm)
        self.input_proj = InputProjection(c.proj_type, c.ffn_dim, c.lm.hidden_size,
                                          dtype=c.lm.dtype, param_dtype=c.lm.param_dtype)
        if c.gate_fusion:
            self.gate = Dense((c.lm.hidden_size,), ("adapter_hidden", "embed"),
                              dtype=c.lm.dtype, param_dtype=c.lm.param_dtype)

    def fuse(self, llm_hidden_prev, text_ids):
        """Text-side inputs [B, T, h].

        llm_hidden_prev [B, T, H_llm]: the frozen LLM's last hidden state *before* each text
        token (row t holds h_{t-1}, the state that produced token t; the caller shifts).
        text_ids [B, T]: the reply's token ids. Gate fusion: g = sigmoid(W [p; e] + b),
        g * p + (1 - g) * e; otherwise p + e (or p alone without token embeddings).
        """
        c = self.config
        if llm_hidden_prev.shape[-1] != self.llm_hidden:
            raise ValueError(f"llm_hidden_prev has width {llm_hidden_prev.shape[-1]}, expected "
                             f"{self.llm_hidden}")
        if llm_hidden_prev.shape[:2] != text_ids.shape:
            raise ValueError(f"llm_hidden_prev {llm_hidden_prev.shape} and text_ids "
                             f"{text_ids.shape} disagree on [B, T]")
        p = self.input_proj(llm_hidden_prev.astype(to_dtype(c.lm.dtype)))
        if not c.add_token_embeddings:
            return constrain(p, BTE)
        e = self.lm.embed(text_ids).astype(p.dtype)
        if c.gate_fusion:
            g = jax.nn.sigmoid(self.gate(jnp.concatenate([p, e], axis=-1)))
            out = g * p + (1 - g) * e
        else:
            out = p + e
        return constrain(out, BTE)

    def embed_units(self, unit_ids):
        """Embeddings [.., h] of raw unit values (0..unit_vocab_size-1)."""
        return self.lm.embed(jnp.asarray(unit_ids, jnp.int32) + self.config.unit_offset)

    def sep_embedding(self):
        """Embedding [h] of `<sep>` (ends the text side)."""
        return self.lm.embed(jnp.asarray([self.config.sep_token_id], jnp.int32))[0]

    def eos_embedding(self):
        """Embedding [h] of EOS (ends the unit side)."""
        return self.lm.embed(jnp.asarray([self.config.eos_token_id], jnp.int32))[0]

    def __call__(self, inputs_embeds, positions=None, attention_mask=None, cache=None,
                 last_logits_only: bool = False):
        """The small LM on input embeddings [B, T, h]; returns the CausalLM output
        (logits over the decoder vocabulary, hidden states, cache)."""
        return self.lm(inputs_embeds=inputs_embeds, positions=positions,
                       attention_mask=attention_mask, cache=cache,
                       last_logits_only=last_logits_only)

    def layout_inputs(self, llm_hidden_prev, text_ids, unit_ids, layout, input_unit_ids=None):
        """Input embeddings [B, S, h] and targets [B, S] of a streaming layout.

        Text positions take the fused text-side inputs (gathered by `layout.index`); `<sep>`,
        unit and EOS positions take the token embeddings of their ids. input_unit_ids
        [B, U] (optional, same shape as unit_ids): the units the decoder *reads* at unit
        positions, when they differ from the ones it is trained to predict (`noisy_units`);
        targets always come from unit_ids.
        """
        c = self.config
        text_in = self.fuse(llm_hidden_prev, text_ids)
        ids = dict(sep_token_id=c.sep_token_id, eos_token_id=c.eos_token_id,
                   unit_offset=c.unit_offset)
        tok, targets = streaming.assemble_tokens(layout, unit_ids, **ids)
        if input_unit_ids is not None:
            if input_unit_ids.shape != unit_ids.shape:
                raise ValueError(f"input_unit_ids {input_unit_ids.shape} and unit_ids "
                                 f"{unit_ids.shape} must have the same shape")
            tok, _ = streaming.assemble_tokens(layout, input_unit_ids, **ids)
        tok_emb = self.lm.embed(tok).astype(text_in.dtype)
        is_text = (jnp.asarray(layout.kind) == streaming.TEXT)[..., None]
        x = jnp.where(is_text, streaming.gather_text(layout, text_in), tok_emb)
        return constrain(x, BTE), targets

    def unit_loss(self, llm_hidden_prev, text_ids, unit_ids, layout,
                  input_unit_ids=None) -> UnitLossOutput:
        """Training forward: per-token cross-entropy over unit / EOS targets of a layout.

        llm_hidden_prev [B, T, H_llm] and text_ids [B, T] as in `fuse` (right-padded; rows
        beyond each text length are never read), unit_ids [B, U] raw unit values
        (right-padded), layout from `streaming.build_layout(text_lengths, unit_lengths, ...)`.
        The loss averages over every target token in the batch, like the release's
        Hugging Face loss. input_unit_ids: see `layout_inputs`.
        """
        x, targets = self.layout_inputs(llm_hidden_prev, text_ids, unit_ids, layout,
                                        input_unit_ids)
        out = self.lm(inputs_embeds=x, attention_mask=jnp.asarray(layout.attention_mask))
        logits = out.logits.astype(jnp.float32)
        logz = jax.nn.logsumexp(logits, axis=-1)
        gold = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        mask = jnp.asarray(layout.loss_mask, jnp.float32)
        token_loss = (logz - gold) * mask
        n = jnp.sum(mask)
        return UnitLossOutput(token_loss=token_loss, loss_mask=mask,
                              loss=jnp.sum(token_loss) / jnp.maximum(n, 1.0), num_tokens=n)


def noisy_units(unit_ids, key, rate: float, unit_vocab_size: int):
    """unit_ids [B, U] with each unit replaced, with probability `rate`, by a unit drawn
    uniformly from the codebook (a pure function of `key`).

    Stage 3 feeds these to the decoder while it is trained to predict the clean units
    (`layout_inputs(..., input_unit_ids=)`). Why: consecutive units of speech predict each
    other well, so a decoder trained by teacher forcing alone learns to continue its own
    units and leans little on the text; at inference it then drifts into fluent speech of
    other words. Unreliable unit inputs make the text the dependable signal (the role the
    always-on pre-net dropout plays in Tacotron). Measured in docs/speech_out.md."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"unit input noise rate must be in [0, 1), got {rate}")
    unit_ids = jnp.asarray(unit_ids, jnp.int32)
    if rate == 0.0:
        return unit_ids
    k_hit, k_unit = jax.random.split(key)
    hit = jax.random.bernoulli(k_hit, rate, unit_ids.shape)
    drawn = jax.random.randint(k_unit, unit_ids.shape, 0, unit_vocab_size, jnp.int32)
    return jnp.where(hit, drawn, unit_ids)
