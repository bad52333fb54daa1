"""The content-alignment warm-up (`align_ctc`): CTC of speech embeddings against the
transcript through the frozen LLM's embedding table, no LLM layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from freezeempath_jax.train import losses


def _batch(rng, b=3, s=9, l=4, h=6, v=11):
    speech = rng.normal(size=(b, s, h)).astype(np.float32)
    table = rng.normal(size=(v, h)).astype(np.float32)
    ids = rng.integers(0, v, (b, l)).astype(np.int32)
    mask = np.ones((b, l), np.float32)
    mask[1, 2:] = 0  # a shorter transcript
    mask[-1, :] = 0  # a row without tokens counts nowhere
    return speech, table, {"transcript_ids": ids, "transcript_mask": mask}


def test_align_ctc_equals_torch_ctc_on_the_distance_logits():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    speech, table, batch = _batch(rng)
    loss, sums = losses.align_ctc(jnp.asarray(speech), jnp.asarray(table), batch)
    # reference: the same logits built independently, torch's CTC (blank 0, tokens shifted)
    d2 = ((speech[:, :, None, :] - table[None, None]) ** 2).sum(-1)
    logits = np.concatenate([np.full(d2.shape[:2] + (1,), -2.0), -d2], -1)
    logp = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1).transpose(0, 1)
    lens = batch["transcript_mask"].sum(1).astype(int)
    rows = [0, 1]
    ref = [torch.nn.functional.ctc_loss(
        logp[:, i:i + 1], torch.tensor(batch["transcript_ids"][i, :lens[i]] + 1)[None],
        torch.tensor([speech.shape[1]]), torch.tensor([lens[i]]), blank=0,
        reduction="sum").item() for i in rows]
    assert float(sums["align_examples"]) == 2.0
    np.testing.assert_allclose(float(sums["align_sum"]), sum(ref), rtol=1e-4)
    np.testing.assert_allclose(float(loss), sum(ref) / 2, rtol=1e-4)


def test_align_ctc_pulls_positions_onto_the_transcript_embeddings():
    """Minimising the loss over free speech embeddings puts the transcript's tokens, in
    order, on the greedy path (align_recall -> 1)."""
    rng = np.random.default_rng(1)
    speech, table, batch = _batch(rng, b=2, s=8, l=3, h=8, v=20)
    batch["transcript_mask"][:] = 1.0
    f = jax.jit(jax.value_and_grad(lambda x: losses.align_ctc(x, table, batch)[0]))
    x = jnp.asarray(speech)
    first = None
    for _ in range(300):
        loss, g = f(x)
        first = first if first is not None else float(loss)
        x = x - 0.05 * g
    _, sums = losses.align_ctc(x, table, batch)
    assert float(loss) < 0.1 * first
    assert float(sums["align_hits"]) == float(sums["align_tokens"]) == 6.0
    metrics = losses.finalize_metrics(sums)
    assert float(metrics["align_recall"]) == 1.0


def test_align_objective_trains_only_the_projector_without_the_llm():
    from freezeempath_jax import sharding
    from freezeempath_jax.checkpoints.model_tree import abstract_boxed_params, host_random_params
    from freezeempath_jax.models import presets
    from freezeempath_jax.train import flops
    from freezeempath_jax.train.step import example_batch, make_train_step
    from flax import linen as nn

    cfg = presets.TINY
    tc = {"stage": "1", "objective": "align_ctc", "batch_size": 4, "steps": 3,
          "learning_rate": 1e-2, "frozen_dtype": "float32"}
    ts = make_train_step(cfg, tc, sharding.make_mesh((1, 1, 1)))
    params = host_random_params(nn.meta.unbox(abstract_boxed_params(cfg)))
    state, frozen = ts.from_params(params)
    ts_batch = example_batch(cfg, "align_ctc", 4, mel_frames=80, reply_len=4)
    state2, m = ts.step(state, frozen, {k: v for k, v in ts_batch.items()
                                        if k in ("mel", "transcript_ids", "transcript_mask")})
    assert set(jax.tree.leaves(jax.tree.map(lambda *_: 1, state2.params))) == {1}
    assert list(state2.params) == ["projector"]
    assert np.isfinite(float(m["loss"])) and "loss_align" in m and "align_recall" in m
    parts = flops.flops_breakdown(cfg, tc, seq_len=8, encoder_frames=40)
    assert "llm" not in parts and "align" in parts and "projector" in parts
