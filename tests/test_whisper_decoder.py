"""Whisper decoder (ASR) on tiny random models: logits against transformers'
WhisperForConditionalGeneration through our Hugging Face and OpenAI loaders, the cached
decode against the full pass, and greedy decoding against step-by-step argmax.
Measured: max abs logit error ~1e-6 (float32)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from freezeempath_jax.checkpoints import CheckpointError
from freezeempath_jax.checkpoints.whisper_decoder import load_whisper, load_whisper_decoder
from freezeempath_jax.inference.transcribe import greedy_decode
from freezeempath_jax.models import WhisperDecoder, init_decoder_cache

POS = 50  # encoder positions: 100 mel frames
VOCAB = 300
TOL = 1e-4


@pytest.fixture(scope="module")
def hf_model():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(vocab_size=VOCAB, num_mel_bins=80, d_model=64, encoder_layers=2,
                        encoder_attention_heads=4, decoder_layers=2, decoder_attention_heads=4,
                        encoder_ffn_dim=256, decoder_ffn_dim=256,  # 4 x width, as OpenAI's
                        max_source_positions=POS,
                        max_target_positions=24, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, decoder_start_token_id=1)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random norms and biases: a mis-mapped tensor must show
        dec = model.model.decoder
        dec.embed_tokens.weight.copy_(torch.randn_like(dec.embed_tokens.weight))
        dec.embed_positions.weight.copy_(torch.randn_like(dec.embed_positions.weight))
        for n, p in dec.named_parameters():
            if "layer_norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.RandomState(0)
    mel = rng.randn(2, 80, 2 * POS).astype(np.float32)
    tokens = rng.randint(3, VOCAB, size=(2, 9)).astype(np.int64)
    return mel, tokens


def _torch_logits(model, mel, tokens):
    with torch.no_grad():
        return model(input_features=torch.from_numpy(mel),
                     decoder_input_ids=torch.from_numpy(tokens)).logits.numpy()


def _our_logits(cfgs, params, mel, tokens):
    from freezeempath_jax.models import WhisperEncoder

    enc = WhisperEncoder(cfgs[0]).apply({"params": params["encoder"]}, jnp.asarray(mel))
    out = WhisperDecoder(cfgs[1]).apply({"params": params["decoder"]}, jnp.asarray(tokens),
                                        encoder_states=enc.last_hidden_state)
    return np.asarray(out.logits)


def test_hf_decoder_logits_match_transformers(tmp_path, hf_model, inputs, record_property):
    mel, tokens = inputs
    hf_model.save_pretrained(tmp_path)
    cfgs, params, _ = load_whisper(str(tmp_path))
    dec = cfgs[1]
    assert (dec.vocab_size, dec.d_model, dec.num_layers, dec.num_heads, dec.mlp_dim,
            dec.max_target_positions) == (VOCAB, 64, 2, 4, 256, 24)
    ours, ref = _our_logits(cfgs, params, mel, tokens), _torch_logits(hf_model, mel, tokens)
    err = float(np.abs(ours - ref).max())
    record_property("max_abs_logit_error", err)
    print(f"decoder logits vs transformers: max abs error {err:.2e} (max |ref| "
          f"{np.abs(ref).max():.2f})")
    assert err < TOL


def test_openai_pt_decoder(tmp_path, hf_model, inputs):
    """The same weights renamed to OpenAI-whisper keys in a `.pt` with `dims`."""
    mel, tokens = inputs
    sd = hf_model.state_dict()
    out = {}
    enc_names = {"self_attn.q_proj": "attn.query", "self_attn.k_proj": "attn.key",
                 "self_attn.v_proj": "attn.value", "self_attn.out_proj": "attn.out",
                 "self_attn_layer_norm": "attn_ln", "fc1": "mlp.0", "fc2": "mlp.2",
                 "final_layer_norm": "mlp_ln"}
    dec_names = dict(enc_names, **{"encoder_attn.q_proj": "cross_attn.query",
                                   "encoder_attn.k_proj": "cross_attn.key",
                                   "encoder_attn.v_proj": "cross_attn.value",
                                   "encoder_attn.out_proj": "cross_attn.out",
                                   "encoder_attn_layer_norm": "cross_attn_ln"})
    for k, v in sd.items():
        if k == "proj_out.weight":
            continue
        side, rest = k.split(".", 2)[1], k.split(".", 2)[2]
        names = enc_names if side == "encoder" else dec_names
        rest = (rest.replace("embed_positions.weight", "positional_embedding")
                .replace("embed_tokens.", "token_embedding.").replace("layers.", "blocks."))
        if rest.startswith("layer_norm."):
            rest = ("ln_post." if side == "encoder" else "ln.") + rest.split(".", 1)[1]
        for theirs, ours in names.items():
            rest = rest.replace(f".{theirs}.", f".{ours}.")
        out[f"{side}.{rest}"] = v.clone()
    dims = dict(n_mels=80, n_audio_ctx=POS, n_audio_state=64, n_audio_head=4, n_audio_layer=2,
                n_vocab=VOCAB, n_text_ctx=24, n_text_state=64, n_text_head=4, n_text_layer=2)
    path = tmp_path / "tiny.pt"
    torch.save({"dims": dims, "model_state_dict": out}, path)
    cfgs, params, _ = load_whisper(str(path))
    np.testing.assert_allclose(_our_logits(cfgs, params, mel, tokens),
                               _torch_logits(hf_model, mel, tokens), atol=TOL, rtol=0)


def test_missing_decoder_key_is_named(tmp_path, hf_model):
    from safetensors.torch import load_file, save_file

    hf_model.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(f)
    del sd["model.decoder.layers.1.fc2.weight"]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        load_whisper_decoder(str(tmp_path))
    assert "model.decoder.layers.1.fc2.weight" in str(err.value)


def test_cached_decode_equals_full_pass_and_greedy_is_argmax(tmp_path, hf_model, inputs):
    mel, tokens = inputs
    hf_model.save_pretrained(tmp_path)
    (enc_cfg, dec_cfg), params, _ = load_whisper(str(tmp_path))
    dec = WhisperDecoder(dec_cfg)
    from freezeempath_jax.models import WhisperEncoder

    enc = WhisperEncoder(enc_cfg).apply({"params": params["encoder"]}, mel).last_hidden_state
    full = dec.apply({"params": params["decoder"]}, tokens, encoder_states=enc).logits
    cache = init_decoder_cache(dec_cfg, 2, 12, enc.shape[1])
    a = dec.apply({"params": params["decoder"]}, tokens[:, :4], encoder_states=enc, cache=cache)
    steps = [a.logits]
    c = a.cache
    for i in range(4, tokens.shape[1]):
        o = dec.apply({"params": params["decoder"]}, tokens[:, i:i + 1], cache=c)
        steps.append(o.logits)
        c = o.cache
    np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=1e-5, rtol=0)

    # greedy: each new token is the argmax of the full pass over the prompt + earlier tokens
    prompt = np.array([1, 5], np.int32)
    sup = np.zeros(VOCAB, np.float32)
    sup[7] = -np.inf  # a suppressed id is never produced
    toks, lens = greedy_decode(enc_cfg, dec_cfg, params, jnp.asarray(mel), jnp.asarray(prompt),
                               jnp.asarray(sup), jnp.zeros(VOCAB), jnp.int32(2),
                               max_new_tokens=10)
    toks, lens = np.asarray(toks), np.asarray(lens)
    # one teacher-forced pass over prompt + output: every produced token (up to and including
    # EOT) is the argmax at the position before it
    seq = np.concatenate([np.broadcast_to(prompt, (2, 2)), toks], 1)
    logits = np.asarray(dec.apply({"params": params["decoder"]}, seq,
                                  encoder_states=enc).logits) + sup
    for r in range(2):
        n = min(lens[r] + 1, 10)
        np.testing.assert_array_equal(logits[r, 1:1 + n].argmax(-1), toks[r, :n])
        assert (toks[r, lens[r]:] == 2).all()
