"""Our own checkpoint format (orbax params + config.json): save/restore round trips of the
tiny FreezeEmpath tree (full and a trainable subset), restore onto a multi-device mesh, and
`freezeempath-jax convert` for every kind, whose output must restore to exactly what the
direct loader returns.

Bit-identical means same tree, same dtypes and the same bytes in every leaf (compared as
raw bytes, so bf16 leaves and signed zeros count too).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from freezeempath_jax.checkpoints.assemble import flatten

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
FROZEN = ("whisper/", "llm/")  # the parts the release keeps in bf16
SUBSET = r"(projector|emotion)/.*"


def _is_leaf(x):
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def flat(tree):
    return flatten(tree, is_leaf=_is_leaf)


def random_tree(config, seed=0):
    """A full FreezeEmpath parameter tree of `config` with random values, as jax arrays:
    Whisper and LLM leaves in bf16, the rest float32 (the layout a converted release has)."""
    from flax import linen as nn

    from freezeempath_jax.checkpoints.assemble import unflatten
    from freezeempath_jax.checkpoints.model_tree import abstract_params, freezeempath_init

    shapes = flat(nn.meta.unbox(abstract_params(freezeempath_init(config))))
    rng = np.random.default_rng(seed)
    out = {}
    for path, s in sorted(shapes.items()):
        x = rng.standard_normal(s.shape).astype(np.float32)
        dt = ml_dtypes.bfloat16 if path.startswith(FROZEN) else np.float32
        out[path] = jnp.asarray(x.astype(dt))
    return unflatten(out)


def assert_bit_identical(a, b):
    fa, fb = flat(a), flat(b)
    assert sorted(fa) == sorted(fb), set(fa) ^ set(fb)
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape, (k, x.dtype, y.dtype, x.shape, y.shape)
        assert x.tobytes() == y.tobytes(), k


@pytest.fixture(scope="module")
def tiny_tree():
    from freezeempath_jax.models.presets import TINY

    return TINY, random_tree(TINY)


# ---------------------------------------------------------------------------- round trips


def test_full_round_trip_bit_identical(tmp_path, tiny_tree):
    from freezeempath_jax.checkpoints import load_converted, save_params

    config, params = tiny_tree
    save_params(str(tmp_path / "ck"), params, config=config)
    kind, cfg, restored = load_converted(str(tmp_path / "ck"))
    assert kind == "freezeempath" and cfg == config
    assert_bit_identical(restored, params)
    assert {np.asarray(x).dtype.name for x in jax.tree.leaves(restored["llm"])} == {"bfloat16"}
    with pytest.raises(FileExistsError):  # never silently replaces a checkpoint
        save_params(str(tmp_path / "ck"), params)
    save_params(str(tmp_path / "ck"), params, overwrite=True)


def test_subset_round_trip(tmp_path, tiny_tree):
    from flax import linen as nn

    from freezeempath_jax.checkpoints import merge_params, restore_params, save_params
    from freezeempath_jax.checkpoints.model_tree import abstract_params, freezeempath_init

    config, params = tiny_tree
    save_params(str(tmp_path / "sub"), params, SUBSET, config=config)
    doc = json.loads((tmp_path / "sub" / "config.json").read_text())
    assert doc["subset"] == SUBSET and doc["kind"] == "freezeempath"

    restored = restore_params(str(tmp_path / "sub"))
    assert set(restored) == {"projector", "emotion"}
    assert_bit_identical(restored, {k: params[k] for k in ("projector", "emotion")})

    # a full-model target restores just the saved part; merging it into other params
    # (e.g. freshly loaded frozen parts) gives the full tree back
    target = nn.meta.unbox(abstract_params(freezeempath_init(config)))
    target = jax.tree.map(lambda s, p: jax.ShapeDtypeStruct(s.shape, p.dtype), target, params)
    part = restore_params(str(tmp_path / "sub"), target)
    assert set(part) == {"projector", "emotion"}
    other = random_tree(config, seed=1)
    merged = merge_params(other, part)
    assert_bit_identical({k: merged[k] for k in ("projector", "emotion")},
                         {k: params[k] for k in ("projector", "emotion")})
    assert_bit_identical(merged["llm"], other["llm"])

    with pytest.raises(ValueError, match="matches no parameter"):
        save_params(str(tmp_path / "none"), params, r"nothing/.*")


def test_restore_rejects_wrong_shapes(tmp_path, tiny_tree):
    from freezeempath_jax.checkpoints import CheckpointError, restore_params, save_params

    config, params = tiny_tree
    save_params(str(tmp_path / "ck"), params, SUBSET)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          {"projector": params["projector"]})
    k = target["projector"]["linear1"]["kernel"]
    target["projector"]["linear1"]["kernel"] = jax.ShapeDtypeStruct((k.shape[0] + 1,) +
                                                                    k.shape[1:], k.dtype)
    with pytest.raises(CheckpointError) as err:
        restore_params(str(tmp_path / "ck"), target)
    assert err.value.keys() == ["projector/linear1/kernel"]
    assert str(tuple(k.shape)) in str(err.value)


# --------------------------------------------------------------------- multi-device restore

SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from freezeempath_jax import sharding as sh
    from freezeempath_jax.checkpoints import load_freezeempath, restore_params, save_params
    from freezeempath_jax.checkpoints.model_tree import freezeempath_init, mesh_shardings
    from freezeempath_jax.models.presets import TINY
    from test_checkpoints_orbax import SUBSET, flat, random_tree

    root, release = sys.argv[1], sys.argv[2]
    assert jax.device_count() == 8, jax.devices()
    params = random_tree(TINY)  # on device 0
    ref = {k: np.asarray(v) for k, v in flat(params).items()}
    save_params(root + "/single", params)

    def target(mesh_shape):
        shardings = mesh_shardings(freezeempath_init(TINY), sh.make_mesh(mesh_shape))
        return jax.tree.map(lambda s, p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
                            shardings, params)

    def report(restored, tgt, ref=ref):
        r, t = flat(restored), flat(tgt)
        return dict(
            keys_equal=sorted(r) == sorted(t),
            shardings_equal=all(r[k].sharding == t[k].sharding for k in r),
            bits_equal=all(np.asarray(r[k]).tobytes() == ref[k].tobytes() for k in r),
            dtypes_equal=all(r[k].dtype == ref[k].dtype for k in r),
            split=sum(r[k].sharding.shard_shape(r[k].shape) != r[k].shape for k in r),
            leaves=len(r))

    out = {}
    t222 = target((2, 2, 2))
    a = restore_params(root + "/single", t222)
    out["single->2x2x2"] = report(a, t222)
    # Saving from the mesh: each device writes its own shards. Only the trainable subset is
    # saved here: orbax compiles a slice per distinct shape on a first sharded save, ~20 s for
    # the full tree on two CPU cores, and the subset exercises the same code.
    save_params(root + "/sharded", a, SUBSET)
    t181 = {k: v for k, v in target((1, 8, 1)).items() if k in ("projector", "emotion")}
    b = restore_params(root + "/sharded", t181)
    out["2x2x2->1x8x1"] = report(b, t181)
    c = restore_params(root + "/sharded")
    out["2x2x2->single"] = report(c, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.
                                       SingleDeviceSharding(jax.devices()[0])), t181))

    # the loaders place each leaf on the mesh as they build it (mesh= resolves the model's
    # logical axis names); values must equal a plain single-device load
    cfg, plain = load_freezeempath(release)
    mesh = sh.make_mesh((2, 2, 2))
    cfg2, placed = load_freezeempath(release, mesh=mesh)
    want = jax.tree.map(lambda s, p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
                        mesh_shardings(freezeempath_init(cfg), mesh), plain)
    out["release->2x2x2"] = report(placed, want,
                                   {k: np.asarray(v) for k, v in flat(plain).items()})
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    env = dict(os.environ)
    # the device count must be set before jax starts, and pytest started it long ago
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    from release_fixture import build_release

    root = tmp_path_factory.mktemp("sharded")
    rel = build_release(str(root / "src"))
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(root), rel.path],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("case", ["single->2x2x2", "2x2x2->1x8x1", "2x2x2->single",
                                  "release->2x2x2"])
def test_restore_onto_mesh(sharded_results, case):
    r = sharded_results[case]
    assert r["keys_equal"] and r["shardings_equal"] and r["dtypes_equal"] and r["bits_equal"], r
    if case != "2x2x2->single":
        assert r["split"] > 0, r  # some leaves really are split across devices


# ------------------------------------------------------------------------ convert (the CLI)


def cli_convert(kind, src, out, *extra):
    from freezeempath_jax.cli import main

    assert main(["convert", "--kind", kind, "--from", str(src), "--out", str(out),
                 *extra]) == 0
    return str(out)


def assert_same_as_direct(out, kind, direct):
    from freezeempath_jax.checkpoints import load_converted

    got_kind, cfg, params = load_converted(out)
    assert got_kind == kind
    assert cfg == direct[0]
    assert_bit_identical(params, direct[1])
    doc = json.loads((Path(out) / "config.json").read_text())
    assert doc["format"] == "freezeempath-jax" and os.path.isabs(doc["source"])


@pytest.fixture(scope="module")
def whisper_sources(tmp_path_factory):
    """A tiny Whisper in all three formats: Hugging Face dir, OpenAI .pt, CTranslate2 dir."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from freezeempath_jax.checkpoints import load_whisper_encoder, save_whisper_encoder_ct2
    from release_fixture import OpenAIWhisperEncoder

    import torch

    root = tmp_path_factory.mktemp("whisper_src")
    torch.manual_seed(0)
    WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=51864, num_mel_bins=80, d_model=64, encoder_layers=2,
        encoder_attention_heads=4, decoder_layers=1, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=50,
        max_target_positions=32)).save_pretrained(root / "hf")
    enc = OpenAIWhisperEncoder(d=64, heads=1, layers=2, n_ctx=50)
    torch.save({"dims": enc.dims, "model_state_dict": {
        "encoder." + k: v for k, v in enc.state_dict().items()}}, root / "tiny.pt")
    cfg, params = load_whisper_encoder(str(root / "hf"))
    save_whisper_encoder_ct2(str(root / "ct2"), cfg, params, dtype=np.float16)
    return {"hf": root / "hf", "openai": root / "tiny.pt", "ct2": root / "ct2"}


@pytest.mark.parametrize("fmt", ["hf", "openai", "ct2"])
def test_convert_whisper(tmp_path, whisper_sources, fmt, capsys):
    from freezeempath_jax.checkpoints import load_whisper_encoder

    out = cli_convert("whisper", whisper_sources[fmt], tmp_path / "out")
    assert "converted whisper checkpoint" in capsys.readouterr().out
    assert_same_as_direct(out, "whisper", load_whisper_encoder(str(whisper_sources[fmt])))
    assert not (tmp_path / "out" / "tokenizer").exists()


def _tiny_tokenizer(directory):
    """A word-level tokenizer over the tiny LM's 96 ids, saved with save_pretrained.

    (Beside a Qwen2 config.json, transformers reads it back as a Qwen2Tokenizer, which keeps
    the vocabulary but not the word-level model: only the vocabulary is compared.)
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(94)}
    vocab.update({"<unk>": 94, "<eos>": 95})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                            eos_token="<eos>").save_pretrained(directory)


@pytest.fixture(scope="module")
def llm_sources(tmp_path_factory):
    from test_checkpoints_causal_lm import tiny_lm, write_gguf

    root = tmp_path_factory.mktemp("llm_src")
    model = tiny_lm("qwen2", tie=False)
    model.save_pretrained(root / "hf", max_shard_size="60KB")
    _tiny_tokenizer(root / "hf")
    write_gguf(root / "m.gguf", tiny_lm("llama", tie=True), "llama", quantize=("ffn_gate",))
    return {"hf": root / "hf", "gguf": root / "m.gguf"}


@pytest.mark.parametrize("fmt,dtype", [("hf", None), ("hf", "bfloat16"), ("gguf", None)])
def test_convert_llm(tmp_path, llm_sources, fmt, dtype):
    from freezeempath_jax.checkpoints import load_causal_lm, load_tokenizer

    extra = ["--dtype", dtype] if dtype else []
    out = cli_convert("llm", llm_sources[fmt], tmp_path / "out", *extra)
    direct = load_causal_lm(str(llm_sources[fmt]), dtype=jnp.dtype(dtype or "float32"))
    assert_same_as_direct(out, "llm", direct)
    tok_dir = tmp_path / "out" / "tokenizer"
    if fmt == "hf":  # the tokenizer beside the weights travels with them (+ placeholders)
        vocab = load_tokenizer(str(tok_dir)).get_vocab()
        assert vocab == load_tokenizer(str(llm_sources[fmt])).get_vocab()
        assert vocab["w7"] == 7 and {"<speech>", "<emotion>"} <= set(vocab)
    else:  # this GGUF carries no tokenizer metadata: weights convert, no tokenizer
        assert not tok_dir.exists()


@pytest.mark.parametrize("whisper_inside", [True, False])
def test_convert_freezeempath(tmp_path, whisper_inside):
    from freezeempath_jax.checkpoints import load_freezeempath
    from release_fixture import build_release

    rel = build_release(str(tmp_path), whisper_inside=whisper_inside)
    extra = [] if whisper_inside else ["--whisper", rel.whisper_path]
    out = cli_convert("freezeempath", rel.path, tmp_path / "out", *extra)
    # defaults on both sides: trainable parts float32, frozen Whisper + LLM bf16
    direct = load_freezeempath(rel.path, whisper=rel.whisper_path)
    assert_same_as_direct(out, "freezeempath", direct)
    assert {np.asarray(x).dtype.name for x in jax.tree.leaves(direct[1]["llm"])} == {"bfloat16"}


def test_convert_reports_broken_input(tmp_path):
    from freezeempath_jax.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match="no such file or directory"):
        cli_convert("llm", tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


# ------------------------------------------------- converted directories through the loaders


def test_loaders_read_converted_directories(tmp_path, tiny_tree):
    """`load_whisper_encoder`, `load_causal_lm` and `load_freezeempath` (and so the trainer's
    `config.init.*` and `chat`) take our own format too: the same values, cast to the dtype
    asked for, and a converted directory of the wrong kind is refused by name."""
    import dataclasses

    from freezeempath_jax.checkpoints import (CheckpointError, load_causal_lm,
                                              load_freezeempath, load_whisper_encoder,
                                              save_params)

    config, params = tiny_tree
    save_params(str(tmp_path / "whisper"), params["whisper"], config=config.whisper)
    save_params(str(tmp_path / "llm"), params["llm"], config=config.llm)
    save_params(str(tmp_path / "full"), params, config=config)

    wcfg, wp = load_whisper_encoder(str(tmp_path / "whisper"), dtype=jnp.float32)
    assert wcfg == dataclasses.replace(config.whisper, param_dtype="float32")
    assert_bit_identical(wp, jax.tree.map(lambda x: x.astype(jnp.float32), params["whisper"]))

    lcfg, lp = load_causal_lm(str(tmp_path / "llm"), dtype=jnp.bfloat16)
    assert lcfg.param_dtype == "bfloat16"
    assert_bit_identical(lp, params["llm"])

    fcfg, fp = load_freezeempath(str(tmp_path / "full"), dtype=jnp.float32,
                                 frozen_dtype=jnp.bfloat16)
    assert fcfg.llm.param_dtype == fcfg.whisper.param_dtype == "bfloat16"
    assert_bit_identical(fp, params)

    with pytest.raises(CheckpointError, match="kind"):
        load_causal_lm(str(tmp_path / "whisper"))
