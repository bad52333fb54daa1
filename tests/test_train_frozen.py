"""Frozen means frozen: only the stage's trainable leaves move and own optimizer state; the
optax guard zeroes a frozen leaf that reaches the optimizer; gradients flow through the frozen
LLM into the adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from freezeempath_jax import params as P_
from freezeempath_jax.models.presets import TINY
from freezeempath_jax.sharding import make_mesh
from freezeempath_jax.train import optimizer as opt_lib
from freezeempath_jax.checkpoints.model_tree import abstract_boxed_params, host_random_params
from freezeempath_jax.train.step import example_batch, make_train_step

STEPS = 3
MEL_FRAMES = 60  # 30 encoder frames -> 6 speech tokens (TINY allows short inputs)


@pytest.fixture(scope="module")
def full_params():
    return host_random_params(nn.meta.unbox(abstract_boxed_params(TINY)), seed=1)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh((1, 1, 1), devices=jax.devices()[:1])


def _np_tree(tree):
    return {p: np.array(v) for p, v in P_.flatten_with_paths(tree).items()}


@pytest.mark.parametrize("stage,objective,trained_prefix", [
    ("1", "distill_ce", "projector/"),
    ("2a", "emotion_ce", "emotion/"),
    ("3a", "unit_ce", "speech_decoder/"),
])
def test_only_trainable_leaves_move(full_params, mesh, stage, objective, trained_prefix):
    ts = make_train_step(TINY, dict(stage=stage, steps=20, learning_rate=1e-3,
                                    weight_decay=0.01), mesh)
    state, frozen = ts.from_params(full_params)
    flat_full = P_.flatten_with_paths(full_params)
    train0, frozen0 = _np_tree(state.params), _np_tree(frozen)
    assert train0 and all(p.startswith(trained_prefix) for p in train0)
    assert not set(train0) & set(frozen0)
    assert set(train0) | set(frozen0) == set(flat_full)
    # Frozen leaves are stored in bf16, trainable ones as fp32 master weights.
    assert {v.dtype for v in frozen0.values()} == {np.dtype(jnp.bfloat16)}
    assert {v.dtype for v in train0.values()} == {np.dtype(np.float32)}
    for p, v in frozen0.items():
        np.testing.assert_array_equal(v, flat_full[p].astype(jnp.bfloat16), err_msg=p)

    batch = example_batch(TINY, objective, 4, mel_frames=MEL_FRAMES, seed=2)
    losses_seen = []
    for _ in range(STEPS):
        state, metrics = ts.step(state, frozen, batch)
        losses_seen.append(float(metrics["loss"]))
        assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
    assert int(state.step) == STEPS

    for p, v in _np_tree(frozen).items():
        assert np.array_equal(v, frozen0[p]), f"frozen leaf {p} changed"
    moved = {p: not np.array_equal(v, train0[p]) for p, v in _np_tree(state.params).items()}
    assert all(moved.values()), [p for p, m in moved.items() if not m]
    # Optimizer state: moment buffers for exactly the trainable leaves (mu and nu each).
    assert opt_lib.opt_state_param_paths(state.opt_state) == set(train0)
    arrays = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert len(arrays) == 2 * len(train0)
    # Same batch, small Adam steps: the loss goes down (gradient sign is right end to end).
    assert losses_seen[-1] < losses_seen[0], losses_seen


def test_gradient_flows_through_frozen_llm(full_params, mesh):
    """The projector's only path to the stage 1 loss is through the frozen LLM: its gradient
    is non-zero everywhere and matches a central finite difference of the loss."""
    ts = make_train_step(TINY, dict(stage="1", steps=10, frozen_dtype="float32"), mesh)
    model = ts.model
    from freezeempath_jax.train.step import objective_fn
    from freezeempath_jax.train import losses
    state, frozen = ts.from_params(full_params)
    batch = jax.tree.map(jnp.asarray, example_batch(TINY, "distill_ce", 2,
                                                    mel_frames=MEL_FRAMES, seed=3))
    f = objective_fn(model, ts.train_config)
    norm = losses.normalizers(batch, "distill_ce")

    @jax.jit
    def loss_and_grad(trainable):
        return jax.value_and_grad(lambda t: f(P_.merge(t, frozen), batch, norm)[0])(trainable)

    loss, grads = loss_and_grad(state.params)
    for p, g in P_.flatten_with_paths(grads).items():
        assert p.startswith("projector/")
        assert float(jnp.max(jnp.abs(g))) > 0, p
    # Directional derivative along the gradient vs central differences (float32).
    g_sq = sum(float(jnp.sum(g * g)) for g in jax.tree.leaves(grads))
    eps = 1e-3 / np.sqrt(g_sq)
    plus = loss_and_grad(jax.tree.map(lambda w, g: w + eps * g, state.params, grads))[0]
    minus = loss_and_grad(jax.tree.map(lambda w, g: w - eps * g, state.params, grads))[0]
    fd = (float(plus) - float(minus)) / (2 * eps)
    np.testing.assert_allclose(fd, g_sq, rtol=2e-2)


def test_partial_params_fill_missing_randomly(full_params, mesh):
    """Loaded Whisper + LLM with a fresh projector (the usual stage 1 start)."""
    ts = make_train_step(TINY, dict(stage="1", steps=10), mesh)
    given = {k: v for k, v in full_params.items() if k != "projector"}
    state, frozen = ts.from_params(given, jax.random.PRNGKey(7))
    proj = P_.flatten_with_paths(state.params)
    assert set(proj) == {p for p in P_.flatten_with_paths(full_params)
                         if p.startswith("projector/")}
    k = np.asarray(proj["projector/linear1/kernel"])
    assert k.std() > 0 and np.all(np.asarray(proj["projector/linear1/bias"]) == 0)
    np.testing.assert_array_equal(np.asarray(frozen["llm"]["norm"]["scale"]),
                                  np.asarray(full_params["llm"]["norm"]["scale"],
                                             jnp.bfloat16))
    with pytest.raises(ValueError, match="unexpected parameters.*llm/extra"):
        ts.from_params({**given, "llm": {**given["llm"], "extra": np.zeros(3)}})
    bad = {**given, "llm": {**given["llm"], "norm": {"scale": np.zeros(5)}}}
    with pytest.raises(ValueError, match="mis-shaped.*llm/norm/scale"):
        ts.from_params(bad)


def test_guard_keeps_a_frozen_leaf_that_reaches_the_optimizer():
    rng = np.random.default_rng(0)
    tree = {"projector": {"linear1": {"kernel": jnp.asarray(rng.normal(size=(4, 3)),
                                                            jnp.float32),
                                      "bias": jnp.zeros((3,))}},
            "llm": {"norm": {"scale": jnp.ones((3,))},
                    "lm_head": {"kernel": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)}}}
    tx = opt_lib.make_optimizer(P_.stage_table("1"), learning_rate=0.1, total_steps=10,
                                weight_decay=0.1)
    opt_state = tx.init(tree)
    assert opt_lib.opt_state_param_paths(opt_state) == {"projector/linear1/kernel",
                                                        "projector/linear1/bias"}
    params = tree
    for _ in range(3):
        grads = jax.tree.map(jnp.ones_like, params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    for path in ("llm/norm/scale", "llm/lm_head/kernel"):
        a = P_.flatten_with_paths(params)[path]
        b = P_.flatten_with_paths(tree)[path]
        assert np.array_equal(np.asarray(a), np.asarray(b)), path
    for path in ("projector/linear1/kernel", "projector/linear1/bias"):
        assert not np.array_equal(np.asarray(P_.flatten_with_paths(params)[path]),
                                  np.asarray(P_.flatten_with_paths(tree)[path])), path


def test_weight_decay_skips_biases_and_norms():
    """With zero gradients only decayed leaves move: kernels shrink, biases / scales stay."""
    tree = {"projector": {"linear1": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
                          "norm": {"scale": jnp.ones((2,))}}}
    tx = opt_lib.make_optimizer([("projector/.*", "trainable")], learning_rate=0.1,
                                total_steps=4, weight_decay=0.5, grad_clip_norm=None)
    st = tx.init(tree)
    upd, _ = tx.update(jax.tree.map(jnp.zeros_like, tree), st, tree)
    flat = P_.flatten_with_paths(upd)
    assert float(jnp.max(flat["projector/linear1/kernel"])) < 0
    assert float(jnp.max(jnp.abs(flat["projector/linear1/bias"]))) == 0
    assert float(jnp.max(jnp.abs(flat["projector/norm/scale"]))) == 0


def test_schedule_warmup_and_cosine():
    sched = opt_lib.make_schedule(1.0, 100, warmup_fraction=0.03)
    vals = np.array([float(sched(i)) for i in range(100)])
    np.testing.assert_allclose(vals[:3], [1 / 3, 2 / 3, 1.0], rtol=1e-6)  # ceil(3) warmup
    assert np.all(np.diff(vals[2:]) <= 1e-7) and 0 < vals[-1] < 0.01
    # Update k reads the optax schedule at k + 1; the cosine spans optax steps 3..101, so
    # update 51 (optax step 52) sits half-way: half the peak.
    np.testing.assert_allclose(float(sched(51)), 0.5, atol=1e-6)


@pytest.mark.parametrize("objective", ["distill_ce", "distill_kl", "emotion_ce"])
def test_loss_window_gives_the_whole_row_loss_and_gradient(full_params, objective):
    """With `loss_positions` the LM head runs at the reply positions only (the prompt's
    [B, T, vocab] float32 logits are the largest buffers of a step); the loss and the
    gradients of the trainable parts are those of the whole rows."""
    from freezeempath_jax.models.freezeempath import FreezeEmpath
    from freezeempath_jax.train import losses
    from freezeempath_jax.train.step import TrainConfig, objective_fn

    cfg = TrainConfig(stage="1" if objective.startswith("distill") else "2a",
                      objective=objective, kl_ce_weight=0.5 if objective == "distill_kl" else 0)
    f = objective_fn(FreezeEmpath(TINY), cfg)
    windowed = example_batch(TINY, objective, 4, mel_frames=MEL_FRAMES, reply_len=6)
    whole = {k: v for k, v in windowed.items() if not k.endswith("loss_positions")}
    assert "loss_positions" in windowed and len(whole) < len(windowed)
    norm = losses.normalizers(whole, objective)

    def loss_and_grads(batch):
        (loss, _), g = jax.value_and_grad(lambda p: f(p, batch, norm), has_aux=True)(full_params)
        return loss, g

    loss_w, g_w = loss_and_grads(windowed)
    loss_f, g_f = loss_and_grads(whole)
    np.testing.assert_allclose(float(loss_w), float(loss_f), rtol=1e-6)
    prefix = "projector/" if objective.startswith("distill") else "emotion/"
    gw, gf = _np_tree(g_w), _np_tree(g_f)
    trained = [p for p in gw if p.startswith(prefix)]
    assert trained and any(np.abs(gf[p]).max() > 0 for p in trained)
    for p in trained:
        np.testing.assert_allclose(gw[p], gf[p], rtol=1e-5, atol=1e-7, err_msg=p)
