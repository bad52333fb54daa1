"""Stage 3 on cached LLM states: records that carry `llm_hidden_prev` (the demo's stage-3
recipe, `train.speech_targets`) train the speech decoder without ever running the LLM. The
frozen LLM here has NaN weights: one forward pass through it would make the loss NaN and
stop training."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from freezeempath_jax.train import records, trainer
from freezeempath_jax.train.metrics import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
    from freezeempath_jax.inference import load_config_file

    cfg = load_config_file(os.path.join(REPO, "configs", "tiny.py"))
    with cfg.unlocked():
        for k, v in overrides.items():
            node = cfg
            *path, last = k.split(".")
            for p in path:
                node = node[p]
            node[last] = v
    return cfg


def _nan_llm(path):
    from freezeempath_jax import checkpoints
    from freezeempath_jax.models import CausalLM, presets

    lm = presets.TINY.llm
    p = nn.meta.unbox(CausalLM(lm).init(jax.random.key(1),
                                        input_ids=jnp.zeros((1, 1), jnp.int32))["params"])
    p = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), p)
    checkpoints.save_params(str(path), p, config=lm, kind="llm")
    return str(path)


def _records(n, seed):
    from freezeempath_jax.models import presets

    c = presets.TINY
    rng = np.random.default_rng(seed)
    recs = records.noise_records(n, seed, c.whisper.n_mels, 1.0, c.emotions)
    for i, r in enumerate(recs):
        t = 5 + i % 4
        r["reply_ids"] = rng.integers(10, 300, t).tolist()
        # units a function of the states: learnable from them alone
        h = rng.normal(size=(t, c.llm.hidden_size)).astype(np.float32)
        r["llm_hidden_prev"] = h
        r["units"] = [int(u) % c.speech_decoder.unit_vocab_size
                      for u in np.repeat((h[:, 0] > 0) * 7 + 3, 3)]
    return recs


@pytest.mark.parametrize("aligned", [False, True])
def test_stage3_trains_on_cached_states_without_the_llm(tmp_path, aligned):
    cfg = _config(**{"stage": "3a", "data.kind": "memory", "init.llm": _nan_llm(tmp_path / "llm"),
                     "train.steps": 30, "train.log_every": 10, "train.eval_batches": 1,
                     "train.batch_size": 4, "data.target_len": 12, "data.units_len": 32,
                     "data.unit_temperature": 0.5})
    train, evals = _records(16, 0), _records(4, 1)
    if aligned:  # aligned chunks of 3 units (< M = 5: each chunk ends with an EOS target)
        for r in train + evals:
            r["token_unit_ends"] = [i + 1 for i in range(len(r["reply_ids"]))]
    out = trainer.train(cfg, str(tmp_path / "run"), train_records=train, eval_records=evals)
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert out["step"] == 30
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    # chat speaks at the unit temperature the recipe stored, unless told otherwise
    from freezeempath_jax.inference import load_chat_model
    assert load_chat_model(str(tmp_path / "run")).unit_temperature == 0.5
    assert load_chat_model(str(tmp_path / "run"),
                           unit_temperature=0.9).unit_temperature == 0.9


def test_partly_cached_batches_are_refused():
    from freezeempath_jax.models import presets
    from freezeempath_jax.text.tokenizers import make_tokenizer
    from freezeempath_jax.train.batches import BatchBuilder

    recs = _records(2, 0)
    del recs[1]["llm_hidden_prev"]
    b = BatchBuilder(presets.TINY, "3a", "unit_ce", make_tokenizer(presets.TINY, "byte"), 10,
                     target_len=12, units_len=32)
    with pytest.raises(ValueError, match="lack llm_hidden_prev"):
        b(recs)


def test_batches_follow_the_records_token_unit_ends():
    """Records with `token_unit_ends` (the stage-3 recipe's word timings) get aligned chunks;
    `data.unit_chunks = "fixed"` (or records without them) the release's fixed chunks."""
    from freezeempath_jax.models import presets, streaming
    from freezeempath_jax.text.tokenizers import make_tokenizer
    from freezeempath_jax.train.batches import BatchBuilder

    recs = _records(2, 0)
    # 5 and 6 reply tokens, 15 and 18 units: one unit per token (3 < M = 5 a chunk), the
    # rest after <sep>
    for r in recs:
        r["token_unit_ends"] = [i + 1 for i in range(len(r["reply_ids"]))]
    tok = make_tokenizer(presets.TINY, "byte")
    n, m = presets.TINY.speech_decoder.stream_n, presets.TINY.speech_decoder.stream_m
    aligned = BatchBuilder(presets.TINY, "3a", "unit_ce", tok, 10, target_len=12,
                           units_len=32)(recs)
    fixed = BatchBuilder(presets.TINY, "3a", "unit_ce", tok, 10, target_len=12, units_len=32,
                         unit_chunks="fixed")(recs)
    for row, r in enumerate(recs):
        t, u = len(r["reply_ids"]), len(r["units"])
        want = streaming.build_layout(
            [t], [u], n, m, chunk_ends=[streaming.chunk_ends_from_tokens(
                r["token_unit_ends"], n)])
        got = streaming.layout_from_batch({k: v[row:row + 1] for k, v in aligned.items()})
        assert streaming.describe(got) == streaming.describe(want)
        assert got.chunk_end.sum() > 0
        plain = streaming.layout_from_batch({k: v[row:row + 1] for k, v in fixed.items()})
        assert streaming.describe(plain) == streaming.describe(
            streaming.build_layout([t], [u], n, m))
    with pytest.raises(ValueError, match="unit_chunks"):
        BatchBuilder(presets.TINY, "3a", "unit_ce", tok, 10, unit_chunks="words")


def test_noisy_unit_inputs_keep_the_targets_and_follow_the_key():
    """`noisy_units` replaces about `rate` of the units, is a pure function of its key, and
    `layout_inputs(..., input_unit_ids=)` changes what the decoder reads, never its targets."""
    from freezeempath_jax.models import presets, streaming
    from freezeempath_jax.models.speech_decoder import SpeechDecoder, noisy_units

    k = 512
    units = jnp.asarray(np.random.default_rng(0).integers(0, k, (64, 500)), jnp.int32)
    key = jax.random.key(3)
    noisy = noisy_units(units, key, 0.3, k)
    changed = float(jnp.mean(noisy != units))
    assert abs(changed - 0.3 * (1 - 1 / k)) < 0.01  # a draw may repeat the unit it replaces
    assert int(noisy.min()) >= 0 and int(noisy.max()) < k
    np.testing.assert_array_equal(noisy_units(units, key, 0.3, k), noisy)
    assert bool(jnp.any(noisy_units(units, jax.random.key(4), 0.3, k) != noisy))
    np.testing.assert_array_equal(noisy_units(units, key, 0.0, k), units)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="must be in"):
            noisy_units(units, key, bad, k)

    c = presets.TINY
    sd = c.speech_decoder
    dec = SpeechDecoder(sd, c.llm.hidden_size)
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(2, 6, c.llm.hidden_size)), jnp.float32)
    ids = jnp.asarray(rng.integers(10, 300, (2, 6)), jnp.int32)
    u = jnp.asarray(rng.integers(0, sd.unit_vocab_size, (2, 20)), jnp.int32)
    layout = streaming.build_layout([6, 5], [20, 17], sd.stream_n, sd.stream_m, sd.max_length,
                                    seq_len=40, chunk_ends=[[3, 9], [4]])
    params = dec.init(jax.random.key(0), h, ids, u, layout, method=SpeechDecoder.unit_loss)
    x0, t0 = dec.apply(params, h, ids, u, layout, method=SpeechDecoder.layout_inputs)
    u_in = noisy_units(u, key, 0.5, sd.unit_vocab_size)
    x1, t1 = dec.apply(params, h, ids, u, layout, u_in, method=SpeechDecoder.layout_inputs)
    np.testing.assert_array_equal(t1, t0)
    # inputs differ exactly at unit positions whose unit was replaced
    kind, index = np.asarray(layout.kind), np.asarray(layout.index)
    rows = np.arange(2)[:, None]
    swapped = (kind == streaming.UNIT) & (np.asarray(u_in)[rows, np.clip(index, 0, 19)]
                                          != np.asarray(u)[rows, np.clip(index, 0, 19)])
    differs = np.any(np.asarray(x1) != np.asarray(x0), axis=-1)
    assert swapped.any()
    np.testing.assert_array_equal(differs, swapped)
    with pytest.raises(ValueError, match="same shape"):
        dec.apply(params, h, ids, u, layout, u_in[:, :5], method=SpeechDecoder.layout_inputs)


def test_stage3_with_unit_input_noise_is_seeded_and_resumes_exactly(tmp_path):
    """Noisy unit inputs (`loss.unit_input_noise`) change training and come from the train
    state's key: a run resumed from its step-4 checkpoint (drawing steps 5-8's noise again
    from the restored state) equals the uninterrupted run, bit for bit."""
    import shutil

    from freezeempath_jax.checkpoints.workdir import load_trained_params

    llm = _nan_llm(tmp_path / "llm")

    def run(name, noise):
        cfg = _config(**{"stage": "3a", "data.kind": "memory", "init.llm": llm,
                         "train.steps": 8, "train.log_every": 4, "train.eval_batches": 1,
                         "train.ckpt_every": 4, "train.async_ckpt": False,
                         "train.batch_size": 4, "data.target_len": 12, "data.units_len": 32,
                         "loss.unit_input_noise": noise})
        out = trainer.train(cfg, str(tmp_path / name), train_records=_records(16, 0),
                            eval_records=_records(4, 1))
        assert out["step"] == 8 and np.isfinite(out["train/loss"])
        return cfg, load_trained_params(str(tmp_path / name))[0]

    cfg, noisy = run("a", 0.3)
    _, clean = run("c", 0.0)
    assert any(bool(np.any(np.asarray(a) != np.asarray(b)))
               for a, b in zip(jax.tree.leaves(noisy), jax.tree.leaves(clean)))
    # resume: drop the step-8 checkpoint of a copy, train again from step 4
    shutil.copytree(tmp_path / "a", tmp_path / "r")
    shutil.rmtree(tmp_path / "r" / "checkpoints" / "8")
    trainer.train(cfg, str(tmp_path / "r"), train_records=_records(16, 0),
                  eval_records=_records(4, 1))
    jax.tree.map(np.testing.assert_array_equal, load_trained_params(str(tmp_path / "r"))[0],
                 noisy)
