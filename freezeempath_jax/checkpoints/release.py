"""The released FreezeEmpath checkpoint (DESIGN.md section 3) into our parameter tree.

Key prefixes -> our tree:
    model.embed_tokens / model.layers.* / model.norm / lm_head  -> llm/...
    model.speech_encoder.* (OpenAI-whisper names)             -> whisper/...  (or whisper=)
    model.speech_projector.linear{1,2}                         -> projector/linear{1,2}
    model.emotion_extractor.*                                   -> emotion/... (packed MHA
        in_proj split into q/k/v), hidden2emotion.weight        -> emotion/ser_head/kernel
    speech_generator.model.* (a Qwen2ForCausalLM)               -> speech_decoder/lm/...
    speech_generator.input_proj (linear) | input_proj.{0,2} (ffn) -> speech_decoder/input_proj/
    speech_generator.gate.0                                     -> speech_decoder/gate
The names come from the public code, not from the real files: every mismatch is reported
by key with expected and actual shapes.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import List, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from freezeempath_jax.checkpoints import causal_lm as lm_keys
from freezeempath_jax.checkpoints.assemble import (Placer, Rule, assemble, check, flatten, linear,
                                                   prefixed, unflatten)
from freezeempath_jax.checkpoints.errors import CheckpointError, Problem, config_size
from freezeempath_jax.checkpoints.model_tree import freezeempath_init, make_placer, verify
from freezeempath_jax.checkpoints.formats import converted_kind
from freezeempath_jax.checkpoints.orbax_io import load_converted_part
from freezeempath_jax.checkpoints.safetensors_io import SafetensorsSource, read_config
from freezeempath_jax.checkpoints.whisper import encoder_rules_for, load_whisper_encoder
from freezeempath_jax.models.configs import (EmotionConfig, FreezeEmpathConfig,
                                             ProjectorConfig, SpeechDecoderConfig,
                                             WhisperConfig)

MODEL_TYPES = ("omni2_speech2s_qwen2", "omni2_speech_qwen2", "omni_speech2s_qwen2",
               "omni_speech_qwen2")
ENC = "model.speech_encoder."
PROJ = "model.speech_projector."
EMO = "model.emotion_extractor."
SG = "speech_generator."
_STREAM_RE = re.compile(r"^\s*[\(\[]?\s*(\d+)\s*,\s*(\d+)\s*[\)\]]?\s*$")


def parse_stream_params(value, origin: str = "config.json") -> Tuple[int, int]:
    """(N, M) from "(3,15)", "3, 15", "[3,15]" or a 2-sequence; never evaluates the string."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        try:
            return int(value[0]), int(value[1])
        except (TypeError, ValueError):
            pass
    m = _STREAM_RE.match(value) if isinstance(value, str) else None
    if m is None:
        raise CheckpointError(origin, [Problem("config", key="stream_params", file=origin,
                                               expected="two integers such as '(3,15)'",
                                               actual=repr(value))])
    return int(m.group(1)), int(m.group(2))


def _shape(src, key, dim, default=None):
    return src.shape(key)[dim] if key in src else default


def release_config(cfg: dict, src, whisper_cfg: WhisperConfig, dtype, frozen_dtype,
                   origin: str, placeholder_ids: Optional[Tuple[int, int]] = None
                   ) -> FreezeEmpathConfig:
    """FreezeEmpathConfig from the release config.json plus shapes the config does not state
    (projector / emotion widths, number of queries and classes)."""
    problems = []
    if cfg.get("model_type") not in MODEL_TYPES:
        problems.append(Problem("architecture", key="model_type", file=origin,
                                expected=" or ".join(MODEL_TYPES), actual=cfg.get("model_type")))
    ptype = cfg.get("speech_projector_type", "linear")
    if ptype != "linear":
        problems.append(Problem("config", key="speech_projector_type", file=origin,
                                expected="linear", actual=ptype))
    enc_d = int(cfg.get("speech_encoder_hidden_size", whisper_cfg.d_model))
    if enc_d != whisper_cfg.d_model:
        problems.append(Problem("config", key="speech_encoder_hidden_size", file=origin,
                                expected=whisper_cfg.d_model, actual=enc_d,
                                detail="width of the Whisper encoder found"))
    # Splits the encoder width into heads in `release_rules`: checked before it is used.
    emo_heads = config_size(cfg, "emotion_num_heads", "num_heads", origin, problems, default=4)
    if emo_heads and whisper_cfg.d_model % emo_heads:
        problems.append(Problem("config", key="emotion_num_heads", file=origin,
                                expected=f"a divisor of the encoder width {whisper_cfg.d_model}",
                                actual=emo_heads))
    if problems:
        raise CheckpointError(origin, problems)
    llm = lm_keys.config_from_hf({**cfg, "model_type": "qwen2"}, frozen_dtype, origin)
    k = int(cfg.get("speech_encoder_ds_rate", 5))
    projector = ProjectorConfig(type="linear", k=k,
                                hidden_dim=_shape(src, PROJ + "linear1.weight", 0, 2048))
    lq = EMO + "attn_pool.latent_queries"
    emotion = EmotionConfig(
        gate_hidden=_shape(src, EMO + "gate_fc1.weight", 0, 128),
        num_heads=emo_heads,
        num_queries=int(np.prod(src.shape(lq)[:-1])) if lq in src else 1,
        mlp_hidden=_shape(src, EMO + "linear1.weight", 0, 2048),
        num_classes=_shape(src, "hidden2emotion.weight", 0, 5))
    speech_decoder = None
    if cfg.get("speech_generator"):
        sg = dict(cfg["speech_generator"])
        sg_lm = lm_keys.config_from_hf({**sg, "model_type": sg.get("model_type", "qwen2")},
                                       dtype, origin + ":speech_generator")
        n, m = parse_stream_params(cfg.get("stream_params", "(3,15)"), origin)
        units = int(cfg.get("unit_vocab_size", 8192))
        # Vocabulary = text vocabulary + <sep> + units (DESIGN.md section 2), units last.
        offset = int(cfg.get("unit_offset", sg_lm.vocab_size - units))
        eos = sg.get("eos_token_id", 151645)
        speech_decoder = SpeechDecoderConfig(
            lm=sg_lm, proj_type=cfg.get("speech_generator_proj_type", "linear"),
            ffn_dim=int(cfg.get("tts_ffn_dim_size", 4096)),
            add_token_embeddings=bool(cfg.get("add_token_embeddings", True)),
            gate_fusion=bool(cfg.get("add_gate_fusion", False)), stream_n=n, stream_m=m,
            unit_vocab_size=units, sep_token_id=int(cfg.get("sep_token_id", offset - 1)),
            unit_offset=offset, eos_token_id=int(eos[0] if isinstance(eos, list) else eos),
            max_length=int(cfg.get("tts_max_length", 2048)))
    speech_id, emotion_id = placeholder_ids or (llm.vocab_size, llm.vocab_size + 1)
    return FreezeEmpathConfig(
        whisper=whisper_cfg, projector=projector, emotion=emotion, llm=llm,
        speech_decoder=speech_decoder,
        speech_token_id=int(cfg.get("speech_token_id", speech_id)),
        emotion_token_id=int(cfg.get("emotion_token_id", emotion_id)))


def release_rules(c: FreezeEmpathConfig, src) -> List[Rule]:
    """Key table for everything but the Whisper encoder."""
    d, H = c.whisper.d_model, c.llm.hidden_size
    p, e = c.projector, c.emotion
    rules = prefixed(lm_keys.hf_rules(c.llm, "model.", "lm_head.weight"), "llm/")
    rules += linear("projector/linear1", PROJ + "linear1", p.hidden_dim, p.k * d)
    rules += linear("projector/linear2", PROJ + "linear2", H, p.hidden_dim)

    heads = e.num_heads
    hd = d // heads
    rules += linear("emotion/gate_fc1", EMO + "gate_fc1", e.gate_hidden, d)
    rules += linear("emotion/gate_fc2", EMO + "gate_fc2", 1, e.gate_hidden)
    rules += [Rule("emotion/layernorm/scale", EMO + "layernorm.weight", (d,)),
              Rule("emotion/layernorm/bias", EMO + "layernorm.bias", (d,))]
    lq = EMO + "attn_pool.latent_queries"
    lq_shape = src.shape(lq) if lq in src and len(src.shape(lq)) == 3 else (e.num_queries, d)
    rules.append(Rule("emotion/attn_pool/latent_queries", lq, tuple(lq_shape),
                      lambda x: x.reshape(e.num_queries, d)))
    mha = EMO + "attn_pool.multihead_attn."
    for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
        rules.append(Rule(f"emotion/attn_pool/{name}/kernel", mha + "in_proj_weight", (3 * d, d),
                          lambda w, j=j: np.ascontiguousarray(
                              w[j * d:(j + 1) * d].T).reshape(d, heads, hd)))
        rules.append(Rule(f"emotion/attn_pool/{name}/bias", mha + "in_proj_bias", (3 * d,),
                          lambda b, j=j: b[j * d:(j + 1) * d].reshape(heads, hd)))
    rules += linear("emotion/attn_pool/out_proj", mha + "out_proj", d, d, in_shape=(heads, hd))
    rules += linear("emotion/linear1", EMO + "linear1", e.mlp_hidden, d)
    rules += linear("emotion/linear2", EMO + "linear2", H, e.mlp_hidden)
    rules.append(Rule("emotion/ser_head/kernel", "hidden2emotion.weight", (e.num_classes, H),
                      lambda w: np.ascontiguousarray(w.T)))

    sd = c.speech_decoder
    if sd is not None:
        h = sd.lm.hidden_size
        if SG + "model.model.embed_tokens.weight" in src:  # a Qwen2ForCausalLM
            base, head = SG + "model.model.", SG + "model.lm_head.weight"
        else:  # a bare Qwen2Model with the head beside it
            base, head = SG + "model.", SG + "lm_head.weight"
        rules += prefixed(lm_keys.hf_rules(sd.lm, base, head), "speech_decoder/lm/")
        if sd.proj_type == "linear":
            rules += linear("speech_decoder/input_proj/linear", SG + "input_proj", h, H)
        else:
            rules += linear("speech_decoder/input_proj/fc1", SG + "input_proj.0", sd.ffn_dim, H)
            rules += linear("speech_decoder/input_proj/fc2", SG + "input_proj.2", h, sd.ffn_dim)
        if sd.gate_fusion:
            rules += linear("speech_decoder/gate", SG + "gate.0", h, 2 * h)
    return rules


def _ignores(c: FreezeEmpathConfig, src) -> List[str]:
    ign = lm_keys.hf_ignore(c.llm, "model.", "lm_head.weight")
    if c.speech_decoder is not None:
        base = SG + ("model.model." if SG + "model.model.embed_tokens.weight" in src
                     else "model.")
        ign += lm_keys.hf_ignore(c.speech_decoder.lm, base, SG + "model.lm_head.weight")
        ign.append(re.escape(SG + "lm_head.weight") if c.speech_decoder.lm.tie_embeddings
                   else r"(?!)")
    return ign


def load_freezeempath(path, whisper=None, dtype=jnp.float32, frozen_dtype=jnp.bfloat16, *,
                      shardings=None, mesh=None, rules=None
                      ) -> Tuple[FreezeEmpathConfig, dict]:
    """The released FreezeEmpath model as `(FreezeEmpathConfig, params)`.

    path: the release directory (config.json + safetensors shards with an index), or a
    directory converted to our format (`convert --kind freezeempath`).
    whisper: where the Whisper encoder comes from when the release does not hold it under
    `model.speech_encoder.*` (any format `load_whisper_encoder` reads, or an already loaded
    `(WhisperConfig, params)` pair); when given it wins over the copy inside.
    dtype: dtype of the trainable parts (projector, emotion extractor, speech decoder).
    frozen_dtype: dtype of the frozen Whisper encoder and LLM (bf16 by default).
    shardings / mesh / rules: placement of each finished leaf (see `load_whisper_encoder`).
    Placeholder ids: `speech_token_id` / `emotion_token_id` from config.json, else the ids
    `<speech>`/`<emotion>` get when added to the tokenizer shipped in `path`, else the first
    two ids past the LLM vocabulary.
    """
    path = os.fspath(path)
    if converted_kind(path) is not None:  # our own format (`convert --kind freezeempath`)
        config, params = load_converted_part(
            path, "freezeempath",
            lambda k: frozen_dtype if k.startswith(("whisper/", "llm/")) else dtype,
            shardings=shardings, mesh=mesh, rules=rules)
        if whisper is not None:
            wcfg, wparams = (whisper if isinstance(whisper, tuple) else
                             load_whisper_encoder(whisper, frozen_dtype, shardings=(
                                 Placer(shardings).sub("whisper/") if shardings is not None
                                 else None), mesh=mesh, rules=rules))
            config = dataclasses.replace(config, whisper=wcfg)
            params = dict(params, whisper=wparams)
        return config, params
    origin = os.path.join(path, "config.json")
    cfg_json = read_config(path)
    if cfg_json.get("model_type") not in MODEL_TYPES:
        # checked before anything else: a plain LLM directory passed here by mistake should
        # be named as such, not reported as lacking a Whisper encoder
        raise CheckpointError(path, [Problem(
            "architecture", key="model_type", file=origin, expected=" or ".join(MODEL_TYPES),
            actual=cfg_json.get("model_type"))])
    src = SafetensorsSource(path)

    outside = None
    if whisper is not None:
        outside = whisper if isinstance(whisper, tuple) else None
        if outside is None:
            outside = load_whisper_encoder(whisper, frozen_dtype)  # placed below
        wcfg = outside[0]
        enc_rules: List[Rule] = []
    elif ENC + "conv1.weight" in src:
        heads = cfg_json.get("speech_encoder_num_heads")
        wcfg, enc_rules, _ = encoder_rules_for(src, path, frozen_dtype, num_heads=heads,
                                               prefixes=(ENC,))
        enc_rules = prefixed(enc_rules, "whisper/")
    else:
        raise CheckpointError(path, [Problem(
            "missing", key=ENC + "conv1.weight", file=path,
            detail="no Whisper encoder inside the checkpoint; pass whisper=PATH (a Hugging "
                   "Face, OpenAI .pt or CTranslate2 Whisper checkpoint)")])

    ids = None
    if "speech_token_id" not in cfg_json:
        from freezeempath_jax.text import tokenizers as tk

        if tk.has_tokenizer(path):
            ids = tk.placeholder_ids(tk.load_tokenizer(path, add_placeholder_tokens=False))
    config = release_config(cfg_json, src, wcfg, dtype, frozen_dtype, origin, ids)
    key_rules = enc_rules + release_rules(config, src)
    # frozen parts and trainable parts differ in dtype: assemble them separately
    frozen = [r for r in key_rules if r.target.startswith(("whisper/", "llm/"))]
    trainable = [r for r in key_rules if not r.target.startswith(("whisper/", "llm/"))]
    ignore = _ignores(config, src)
    if whisper is not None:
        ignore.append(re.escape(ENC) + ".*")
    init = freezeempath_init(config)
    placer = make_placer(init, shardings, mesh, rules)

    problems = check(src, key_rules, ignore=ignore)
    if problems:
        raise CheckpointError(path, problems)
    nothing = lambda k: False  # noqa: E731  (already checked as a whole above)
    flat = assemble(src, frozen, frozen_dtype, placer=placer, scope=nothing)
    flat.update(assemble(src, trainable, dtype, placer=placer, scope=nothing))
    if outside is not None:
        for k, v in flatten(outside[1]).items():
            flat["whisper/" + k] = placer("whisper/" + k, np.asarray(v, frozen_dtype))
    verify(flat, init, path)
    return config, unflatten(flat)

