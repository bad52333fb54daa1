"""A tiny synthetic FreezeEmpath release (DESIGN.md section 3) with a PyTorch reference.

`build_release(root, ...)` writes a release directory with the real key names (config.json,
safetensors shards + `model.safetensors.index.json`), optionally the Whisper encoder outside
as an OpenAI-style `.pt`, and returns a `Release` holding the torch modules that produced the
weights. `reference_forward` is the composite forward written from DESIGN.md sections 1-2 in
PyTorch (Whisper blocks OpenAI-style, frame-concat projector, emotion extractor with
`nn.MultiheadAttention`, Qwen2 from transformers), for parity tests of our loader and model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from freezeempath_jax.checkpoints.safetensors_io import save_safetensors_sharded

# Tiny dims; the Whisper width is a multiple of 64 because the release stores no head count
# and Whisper's heads are always 64 wide.
N_MELS, D, ENC_LAYERS, N_CTX = 80, 128, 2, 1500
H, VOCAB = 64, 256
SG_H, UNITS = 32, 32


class OpenAIAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.query, self.key = nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.value, self.out = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1) @ v
        return self.out(a.transpose(1, 2).reshape(b, t, d))


class OpenAIBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.attn, self.attn_ln = OpenAIAttention(d, heads), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.mlp_ln = nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


class OpenAIWhisperEncoder(nn.Module):
    """OpenAI-whisper's AudioEncoder layout; returns (final output, block outputs [L,B,T,d])."""

    def __init__(self, n_mels=N_MELS, d=D, heads=D // 64, layers=ENC_LAYERS, n_ctx=N_CTX):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, d, 3, padding=1)
        self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        # random rather than sinusoids so that a mis-mapped table cannot go unnoticed
        self.register_buffer("positional_embedding", torch.randn(n_ctx, d) * 0.1)
        self.blocks = nn.ModuleList([OpenAIBlock(d, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(d)
        self.dims = dict(n_mels=n_mels, n_audio_ctx=n_ctx, n_audio_state=d, n_audio_head=heads,
                         n_audio_layer=layers, n_vocab=51864, n_text_ctx=448, n_text_state=d,
                         n_text_head=heads, n_text_layer=layers)

    def forward(self, mel):
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)
        x = x + self.positional_embedding[: x.shape[1]]
        states = []
        for blk in self.blocks:
            x = blk(x)
            states.append(x)
        return self.ln_post(x), torch.stack(states)


class Projector(nn.Module):
    def __init__(self, k=5, d=D, hidden=96, out=H):
        super().__init__()
        self.k = k
        self.linear1, self.linear2 = nn.Linear(k * d, hidden), nn.Linear(hidden, out)

    def forward(self, x):
        b, t, d = x.shape
        x = x[:, : t // self.k * self.k].reshape(b, t // self.k, self.k * d)
        return self.linear2(F.relu(self.linear1(x)))


class AttnPool(nn.Module):
    def __init__(self, d=D, heads=4, queries=1):
        super().__init__()
        self.latent_queries = nn.Parameter(torch.randn(queries, d))
        self.multihead_attn = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x):
        q = self.latent_queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.multihead_attn(q, x, x, need_weights=False)[0]


class EmotionExtractor(nn.Module):
    """DESIGN.md section 2: layer gate -> weighted sum -> LayerNorm -> attention pool -> MLP."""

    def __init__(self, d=D, gate=16, heads=4, queries=1, hidden=80, out=H):
        super().__init__()
        self.gate_fc1, self.gate_fc2 = nn.Linear(d, gate), nn.Linear(gate, 1)
        self.layernorm = nn.LayerNorm(d)
        self.attn_pool = AttnPool(d, heads, queries)
        self.linear1, self.linear2 = nn.Linear(d, hidden), nn.Linear(hidden, out)

    def forward(self, states):  # [L, B, T, d]
        s = states.permute(1, 0, 2, 3)
        w = torch.softmax(self.gate_fc2(F.relu(self.gate_fc1(s.mean(2)))).squeeze(-1), -1)
        x = self.layernorm((w[:, :, None, None] * s).sum(1))
        return self.linear2(F.relu(self.linear1(self.attn_pool(x))))


class SpeechGenerator(nn.Module):
    def __init__(self, lm, proj_type="linear", ffn=48, gate_fusion=False, llm_h=H):
        super().__init__()
        h = lm.config.hidden_size
        self.model = lm
        self.input_proj = (nn.Linear(llm_h, h) if proj_type == "linear" else
                           nn.Sequential(nn.Linear(llm_h, ffn), nn.ReLU(), nn.Linear(ffn, h)))
        self.gate = nn.Sequential(nn.Linear(2 * h, h), nn.Sigmoid()) if gate_fusion else None

    def fuse(self, hidden_prev, ids):
        p = self.input_proj(hidden_prev)
        e = self.model.model.embed_tokens(ids)
        if self.gate is None:
            return p + e
        g = self.gate(torch.cat([p, e], -1))
        return g * p + (1 - g) * e


def _qwen2(vocab, hidden, inter, layers, heads, kv, tie):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, rope_theta=10000.0, rms_norm_eps=1e-6,
                      max_position_embeddings=4096, tie_word_embeddings=tie)
    return Qwen2ForCausalLM(cfg).eval()


def _v4_config(lm) -> dict:
    """The Qwen2 fields as transformers 4.43 (the release's version) writes them."""
    c = lm.config
    return {"model_type": "qwen2", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "rope_theta": 10000.0,
            "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": 4096,
            "tie_word_embeddings": c.tie_word_embeddings, "hidden_act": "silu",
            "use_sliding_window": False, "eos_token_id": 2, "torch_dtype": "float32"}


@dataclasses.dataclass
class Release:
    path: str
    whisper_path: Optional[str]
    config_json: dict
    whisper: OpenAIWhisperEncoder
    projector: Projector
    emotion: EmotionExtractor
    hidden2emotion: nn.Linear
    llm: nn.Module
    speech_generator: SpeechGenerator
    state_dict: dict


def build_release(root: str, *, proj_type: str = "linear", gate_fusion: bool = False,
                  whisper_inside: bool = True, max_shard_bytes: int = 400_000,
                  seed: int = 0) -> Release:
    """Writes a tiny release under `root` and returns it with its torch modules."""
    torch.manual_seed(seed)
    whisper = OpenAIWhisperEncoder().eval()
    projector, emotion = Projector().eval(), EmotionExtractor().eval()
    hidden2emotion = nn.Linear(H, 5, bias=False)
    llm = _qwen2(VOCAB, H, 128, 2, 4, 2, tie=False)
    sg_lm = _qwen2(VOCAB + 1 + UNITS, SG_H, 64, 2, 4, 2, tie=True)
    sg = SpeechGenerator(sg_lm, proj_type, gate_fusion=gate_fusion).eval()
    with torch.no_grad():  # non-trivial norms and biases so mapping mistakes show
        for m in (llm, sg_lm):
            for n, p in m.named_parameters():
                if "norm" in n or n.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.1)

    sd = {}
    sd.update({k: v for k, v in llm.state_dict().items()})
    sd.update({"model.speech_projector." + k: v for k, v in projector.state_dict().items()})
    sd.update({"model.emotion_extractor." + k: v for k, v in emotion.state_dict().items()})
    sd["hidden2emotion.weight"] = hidden2emotion.weight
    for k, v in sg.state_dict().items():
        if k == "model.lm_head.weight":  # tied: save_pretrained drops it as well
            continue
        sd["speech_generator." + k] = v
    whisper_path = None
    if whisper_inside:
        sd.update({"model.speech_encoder." + k: v for k, v in whisper.state_dict().items()})
    else:
        whisper_path = os.path.join(root, "whisper_tiny_test.pt")
        torch.save({"dims": whisper.dims, "model_state_dict": {
            "encoder." + k: v for k, v in whisper.state_dict().items()}}, whisper_path)
    path = os.path.join(root, "release")
    arrays = {k: v.detach().float().numpy().copy() for k, v in sd.items()}
    save_safetensors_sharded(arrays, path, max_shard_bytes=max_shard_bytes)
    cfg = dict(_v4_config(llm), model_type="omni2_speech2s_qwen2",
               architectures=["Omni2Speech2SQwen2ForCausalLM"], speech_encoder_type="whisper",
               speech_encoder="models/speech_encoder/large-v3.pt", speech_encoder_ds_rate=5,
               speech_encoder_hidden_size=D, speech_projector_type="linear",
               speech_generator=_v4_config(sg_lm), speech_generator_proj_type=proj_type,
               tts_ffn_dim_size=48, add_token_embeddings=True, add_gate_fusion=gate_fusion,
               stream_params="(3,15)", unit_vocab_size=UNITS, tts_max_length=2048)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return Release(path, whisper_path, cfg, whisper, projector, emotion, hidden2emotion, llm,
                   sg, sd)


@torch.no_grad()
def reference_forward(rel: Release, mel: np.ndarray, input_ids: np.ndarray, speech_id: int,
                      emotion_id: int) -> dict:
    """The composite forward in PyTorch: speech and emotion embeddings spliced, in order, at
    the placeholder positions of `input_ids`, then the LLM. Returns numpy arrays."""
    mel_t, ids = torch.as_tensor(mel), torch.as_tensor(input_ids, dtype=torch.long)
    last, states = rel.whisper(mel_t)
    speech = rel.projector(last)
    emo = rel.emotion(states)
    ser = rel.hidden2emotion(emo.mean(1))
    holder = (ids == speech_id) | (ids == emotion_id)
    emb = rel.llm.model.embed_tokens(torch.where(holder, torch.zeros_like(ids), ids)).clone()
    for b in range(ids.shape[0]):
        for tok, values in ((speech_id, speech[b]), (emotion_id, emo[b])):
            pos = (ids[b] == tok).nonzero().flatten()
            emb[b, pos] = values[: len(pos)]
    hidden = rel.llm.model(inputs_embeds=emb).last_hidden_state
    return {"logits": rel.llm.lm_head(hidden).numpy(), "hidden_states": hidden.numpy(),
            "speech_embeds": speech.numpy(), "emotion_embedding": emo.numpy(),
            "ser_logits": ser.numpy(), "layer_states": states.numpy(), "last": last.numpy()}
