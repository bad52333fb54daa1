"""Model FLOPs of one training step (for throughput logs and MFU).

Only matrix products are counted (dense layers, convolutions, attention scores and the
probability-value product): 2 FLOPs per multiply-add, `2 * rows * fan_in * fan_out` for a
dense layer. Norms, activations, softmax and the loss are left out, as in the usual MFU
convention; so is the extra forward pass of rematerialised blocks (that is hardware work,
not model work).

What the backward pass costs is decided per product from the data flow of the step, the way
JAX's reverse-mode differentiation decides it:
- `y = x @ W`: the forward product; `dx = dy @ W^T` (same cost) only when `x` depends on a
  trainable parameter; `dW = x^T @ dy` (same cost) only when `W` is trainable.
- `y = a @ b` between activations (attention): one more product per operand that depends
  on a trainable parameter.
Hence, per component, as DESIGN.md section 5 lays the stages out:
- the frozen LLM in stages 1/2 (gradients flow *through* it into the adapters) costs 2x its
  forward in its dense layers (forward + input gradient, no weight gradient) and 3x in
  attention (both operands of the score and value products carry gradients);
- trainable parts cost 3x forward, except for their first layer, whose input (the frozen
  encoder's output) needs no gradient: 2x there;
- the frozen Whisper encoder is forward only (and costs nothing when its outputs are cached:
  `data.cache_encoder`). `FreezeEmpath.encode_audio` stops gradients at the encoder outputs,
  so even a table that marks encoder parameters trainable gives them no gradient to compute;
- stage 3 reads the frozen LLM's hidden states under `stop_gradient`: forward only, without
  the LM head (not computed there); the speech decoder is trained (3x);
- the KL teacher pass of stage 1 (`distill_kl`) is forward only.

`train_step_flops` gives the total for a global batch; `flops_breakdown` splits it by part.
"""

from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

from freezeempath_jax import params as P_
from freezeempath_jax.models import streaming
from freezeempath_jax.models.configs import FreezeEmpathConfig, LMConfig, from_dict


class _Counter:
    """Accumulates (forward, forward + backward) FLOPs per part of the model.

    `trainable(path)` answers from the stage's freezing table. Every `dense` / `act` call
    takes whether its input depends on a trainable parameter ("carries a gradient") and
    returns whether its output does, so the callers thread that flag along the data flow.
    """

    def __init__(self, table, no_grad: bool = False):
        self._compiled = [(re.compile(rx), label) for rx, label in table]
        self._table = table
        self.no_grad = no_grad
        self.parts: Dict[str, list] = {}

    def forward_only(self) -> "_Counter":
        """A counter sharing these totals in which nothing carries or takes gradients (parts
        run under stop_gradient, or whose outputs only feed stopped values)."""
        other = _Counter(self._table, no_grad=True)
        other.parts = self.parts
        return other

    def trainable(self, path: str) -> bool:
        if self.no_grad:
            return False
        return P_.match_label(path, self._table, self._compiled) == P_.TRAINABLE

    def _add(self, part: str, forward: float, total: float):
        acc = self.parts.setdefault(part, [0.0, 0.0])
        acc[0] += forward
        acc[1] += total

    def dense(self, part: str, path: str, rows: int, fan_in: int, fan_out: int,
              x_grad: bool, bias: bool = False) -> bool:
        """A dense layer / convolution of `rows` output positions; `path` is the layer's
        parameter prefix (`.../kernel`, `.../bias`)."""
        flops = 2.0 * rows * fan_in * fan_out
        x_grad = x_grad and not self.no_grad
        w_grad = self.trainable(f"{path}/kernel")
        self._add(part, flops, flops * (1 + int(x_grad) + int(w_grad)))
        # A trainable bias alone also makes the output depend on a trainable parameter.
        return x_grad or w_grad or (bias and self.trainable(f"{path}/bias"))

    def act(self, part: str, flops: float, *operand_grads: bool) -> bool:
        """A product of two activations; one backward product per operand with a gradient."""
        grads = 0 if self.no_grad else sum(int(g) for g in operand_grads)
        self._add(part, flops, flops * (1 + grads))
        return grads > 0

    def param(self, path: str, x_grad: bool) -> bool:
        """An elementwise use of a parameter (norm scale, positional table): no FLOPs counted,
        but a trainable one makes the result carry a gradient."""
        return (x_grad and not self.no_grad) or self.trainable(path)


def _whisper(c: _Counter, cfg: FreezeEmpathConfig, frames: int, part: str = "whisper"):
    """Whisper encoder forward (always forward only: see the module docstring)."""
    w = cfg.whisper
    d, t = w.d_model, frames
    c = c.forward_only()
    mel_frames = 2 * t  # conv2 has stride 2: frames in = 2 x positions out
    c.dense(part, "whisper/conv1", mel_frames, 3 * w.n_mels, d, False)
    c.dense(part, "whisper/conv2", t, 3 * d, d, False)
    for _ in range(w.num_layers):
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            c.dense(part, f"whisper/layers/attn/{name}", t, d, d, False)
        c.act(f"{part}/attention", 2.0 * t * t * d)  # q k^T over all heads
        c.act(f"{part}/attention", 2.0 * t * t * d)  # probabilities x v
        c.dense(part, "whisper/layers/mlp/fc1", t, d, w.mlp_dim, False)
        c.dense(part, "whisper/layers/mlp/fc2", t, w.mlp_dim, d, False)


def _projector(c: _Counter, cfg: FreezeEmpathConfig, frames: int) -> Tuple[int, bool]:
    """Speech adapter on the encoder's last states (which carry no gradient).
    Returns (speech tokens, whether they carry a gradient)."""
    p, d, h = cfg.projector, cfg.whisper.d_model, cfg.llm.hidden_size
    if p.type == "linear":
        s = frames // p.k
        g = c.dense("projector", "projector/linear1", s, p.k * d, p.hidden_dim, False, True)
        g = c.dense("projector", "projector/linear2", s, p.hidden_dim, h, g, True)
        return s, g
    channels = p.conv_channels or d
    length, fan_in, g = frames, d, False
    pad = p.conv_kernel // 2
    for i in range(p.conv_layers):
        length = (length + 2 * pad - p.conv_kernel) // p.conv_stride + 1
        g = c.dense("projector", f"projector/conv_{i}", length, p.conv_kernel * fan_in,
                    2 * channels, g, True)
        fan_in = channels  # the GLU halves the channels
    g = c.dense("projector", "projector/proj", length, channels, h, g, True)
    return length, g


def _emotion(c: _Counter, cfg: FreezeEmpathConfig, frames: int, with_heads: bool) -> bool:
    """Emotion extractor on all encoder block outputs (no gradient there). Returns whether
    the emotion embedding carries a gradient."""
    e, w = cfg.emotion, cfg.whisper
    d, n_layers, q, h = w.d_model, w.num_layers, e.num_queries, cfg.llm.hidden_size
    part = "emotion"
    # Layer gate on the per-layer time means (the means themselves are reductions).
    g = c.dense(part, "emotion/gate_fc1", n_layers, d, e.gate_hidden, False, True)
    g = c.dense(part, "emotion/gate_fc2", n_layers, e.gate_hidden, 1, g, True)
    # Gated sum over layers: a contraction over L between the gate weights and the states.
    x = c.act(part, 2.0 * n_layers * frames * d, g, False)
    x = c.param("emotion/layernorm/scale", x) or c.param("emotion/layernorm/bias", x)
    # Attention pooling: learned queries (one set, counted per example) over the frames.
    qg = c.dense(part, "emotion/attn_pool/q_proj", q, d, d,
                 c.param("emotion/attn_pool/latent_queries", False), True)
    kg = c.dense(part, "emotion/attn_pool/k_proj", frames, d, d, x, True)
    vg = c.dense(part, "emotion/attn_pool/v_proj", frames, d, d, x, True)
    pg = c.act(part, 2.0 * q * frames * d, qg, kg)
    og = c.act(part, 2.0 * q * frames * d, pg, vg)
    og = c.dense(part, "emotion/attn_pool/out_proj", q, d, d, og, True)
    og = c.dense(part, "emotion/linear1", q, d, e.mlp_hidden, og, True)
    og = c.dense(part, "emotion/linear2", q, e.mlp_hidden, h, og, True)
    if with_heads:  # only the emotion objective reads the SER / attribute heads
        c.dense(part, "emotion/ser_head", 1, h, e.num_classes, og)
        if e.num_attributes:
            c.dense(part, "emotion/attr_head", 1, h, e.num_attributes, og, True)
        for name, classes in e.cue_heads:  # OSUM-EChat paralinguistic heads
            c.dense(part, f"emotion/{name}_head", 1, h, classes, og, True)
    return og


def _lm(c: _Counter, lm: LMConfig, prefix: str, part: str, t: int, x_grad: bool,
        logits: bool) -> bool:
    """A causal LM over `t` positions (full T x T attention: the mask does not skip work)."""
    h, nh, nkv, hd = lm.hidden_size, lm.num_heads, lm.num_kv_heads, lm.head_dim
    g = x_grad or c.param(f"{prefix}/embed_tokens/embedding", False)
    bias = lm.qkv_bias
    for _ in range(lm.num_layers):
        a = c.param(f"{prefix}/layers/input_norm/scale", g)
        qg = c.dense(part, f"{prefix}/layers/attn/q_proj", t, h, nh * hd, a, bias)
        kg = c.dense(part, f"{prefix}/layers/attn/k_proj", t, h, nkv * hd, a, bias)
        vg = c.dense(part, f"{prefix}/layers/attn/v_proj", t, h, nkv * hd, a, bias)
        # Grouped-query attention still forms one T x T score matrix per query head.
        pg = c.act(f"{part}/attention", 2.0 * t * t * nh * hd, qg, kg)
        og = c.act(f"{part}/attention", 2.0 * t * t * nh * hd, pg, vg)
        og = c.dense(part, f"{prefix}/layers/attn/o_proj", t, nh * hd, h, og)
        g = g or og
        m = c.param(f"{prefix}/layers/post_attn_norm/scale", g)
        gg = c.dense(part, f"{prefix}/layers/mlp/gate_proj", t, h, lm.intermediate_size, m)
        ug = c.dense(part, f"{prefix}/layers/mlp/up_proj", t, h, lm.intermediate_size, m)
        dg = c.dense(part, f"{prefix}/layers/mlp/down_proj", t, lm.intermediate_size, h,
                     gg or ug)
        g = g or dg
    g = c.param(f"{prefix}/norm/scale", g)
    if logits:
        head = (f"{prefix}/embed_tokens" if lm.tie_embeddings else f"{prefix}/lm_head")
        if lm.tie_embeddings:
            # The tied head reads the embedding table: its "kernel" is that table.
            w_grad = c.param(f"{prefix}/embed_tokens/embedding", False)
            flops = 2.0 * t * h * lm.vocab_size
            x_g = g and not c.no_grad
            c._add(part, flops, flops * (1 + int(x_g) + int(w_grad)))
            g = x_g or w_grad
        else:
            g = c.dense(part, head, t, h, lm.vocab_size, g)
    return g


def _speech_decoder(c: _Counter, cfg: FreezeEmpathConfig, reply_len: int, units_len: int):
    """Stage 3: input projection of the LLM states (stopped: no input gradient), fusion with
    the reply's token embeddings, the small LM over the streaming layout and its unit head."""
    sd = cfg.speech_decoder
    h_llm, h = cfg.llm.hidden_size, sd.lm.hidden_size
    part = "speech_decoder"
    pre = "speech_decoder/input_proj"
    if sd.proj_type == "ffn":
        g = c.dense(part, f"{pre}/fc1", reply_len, h_llm, sd.ffn_dim, False, True)
        g = c.dense(part, f"{pre}/fc2", reply_len, sd.ffn_dim, h, g, True)
    else:
        g = c.dense(part, f"{pre}/linear", reply_len, h_llm, h, False, True)
    if sd.add_token_embeddings:
        g = c.param("speech_decoder/lm/embed_tokens/embedding", g)
        if sd.gate_fusion:
            g = c.dense(part, "speech_decoder/gate", reply_len, 2 * h, h, g, True)
    length = streaming.layout_length(reply_len, units_len, sd.max_length)
    _lm(c, sd.lm, "speech_decoder/lm", part, length, g, logits=True)


def flops_breakdown(model_config, train_config, seq_len: int, encoder_frames: int, *,
                    teacher_seq_len: Optional[int] = None, reply_len: Optional[int] = None,
                    units_len: Optional[int] = None, encoder_cached: bool = False,
                    align_vocab: Optional[int] = None) -> Dict[str, Tuple[float, float]]:
    """{part: (forward FLOPs, forward + backward FLOPs)} of one step over the global batch.

    Parts: "whisper", "projector", "emotion", "llm", "teacher" (distill_kl), "speech_decoder"
    (unit_ce), and "<part>/attention" for the attention products of the transformers.
    Arguments as in `train_step_flops`.
    """
    from freezeempath_jax.train.step import TrainConfig
    cfg = from_dict(FreezeEmpathConfig, model_config)
    tc = TrainConfig.from_dict(train_config, allow_extra=True)
    objective = tc.resolved_objective
    table = tc.table
    c = _Counter(table)
    t_enc = int(encoder_frames)

    if objective == "unit_ce":
        if reply_len is None or units_len is None:
            raise ValueError("unit_ce FLOPs need reply_len and units_len (the batch's text "
                             "and unit widths)")
        if cfg.speech_decoder is None:
            raise ValueError("objective unit_ce needs a model config with a speech_decoder")
        # The LLM's hidden states are read under stop_gradient: everything before the
        # speech decoder is forward only and the LM head is never computed.
        front = c.forward_only()
    else:
        front = c
    if not encoder_cached:
        _whisper(front, cfg, t_enc)
    if objective in ("align_ctc", "align_words"):  # projector + distances to token embeddings
        s, _ = _projector(front, cfg, t_enc)
        b = float(tc.batch_size)
        out = {k: (v[0] * b, v[1] * b) for k, v in sorted(c.parts.items())}
        vocab = align_vocab or cfg.llm.vocab_size
        dist = 2.0 * s * vocab * cfg.llm.hidden_size * b
        out["align"] = (dist, 3.0 * dist)  # forward, forward + backward (input gradient)
        return out
    if objective == "ser_ce":  # the emotion extractor and its heads only
        _emotion(front, cfg, t_enc, with_heads=True)
        b = float(tc.batch_size)
        return {k: (v[0] * b, v[1] * b) for k, v in sorted(c.parts.items())}
    _, speech_g = _projector(front, cfg, t_enc)
    emo_g = _emotion(front, cfg, t_enc, with_heads=objective == "emotion_ce")
    # Both adapters' outputs are spliced into the LLM input (for distill objectives the
    # emotion values are still an operand of the splice, though no position selects them).
    _lm(front, cfg.llm, "llm", "llm", int(seq_len), speech_g or emo_g,
        logits=objective != "unit_ce")
    if objective == "distill_kl":
        # The text-only teacher pass: frozen weights, token inputs, logits stopped.
        _lm(c.forward_only(), cfg.llm, "llm", "teacher", int(teacher_seq_len or seq_len),
            False, logits=True)
    if objective == "unit_ce":
        _speech_decoder(c, cfg, int(reply_len), int(units_len))
    b = float(tc.batch_size)
    return {k: (v[0] * b, v[1] * b) for k, v in sorted(c.parts.items())}


def train_step_flops(model_config, train_config, seq_len: int, encoder_frames: int, *,
                     teacher_seq_len: Optional[int] = None, reply_len: Optional[int] = None,
                     units_len: Optional[int] = None, encoder_cached: bool = False,
                     align_vocab: Optional[int] = None) -> float:
    """Model FLOPs (matrix products, forward + backward) of one optimizer step.

    model_config: a `FreezeEmpathConfig` (or its dict); train_config: a `step.TrainConfig`
    (or dict) giving the stage / objective, freezing table and global `batch_size`
    (microbatching does not change the total). seq_len: LLM positions per row (the batch's
    `input_ids` width); encoder_frames: Whisper output positions per clip (1500 for 30 s).
    teacher_seq_len: width of the `distill_kl` teacher rows (default seq_len); reply_len /
    units_len: text and unit widths of stage 3 batches (required for `unit_ce`);
    encoder_cached: the batch carries cached encoder outputs, so Whisper does not run.
    """
    parts = flops_breakdown(model_config, train_config, seq_len, encoder_frames,
                            teacher_seq_len=teacher_seq_len, reply_len=reply_len,
                            units_len=units_len, encoder_cached=encoder_cached,
                            align_vocab=align_vocab)
    return float(sum(total for _, total in parts.values()))


def model_flops_utilization(flops_per_step: float, seconds_per_step: float,
                            peak_flops_per_device: float, num_devices: int = 1) -> float:
    """Achieved model FLOP/s over the peak of all devices (what `metrics.Throughput` logs)."""
    if seconds_per_step <= 0 or peak_flops_per_device <= 0 or num_devices <= 0:
        raise ValueError("seconds_per_step, peak_flops_per_device and num_devices must be > 0")
    return flops_per_step / seconds_per_step / (peak_flops_per_device * num_devices)
