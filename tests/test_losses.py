"""Each training loss against a numpy hand computation on small arrays."""

import functools

import jax
import numpy as np
import pytest

from freezeempath_jax.train import losses as _losses


class _Jitted:
    """The loss functions under jit (one compilation each instead of one per eager op);
    float arguments such as weights and temperatures are static."""

    def __getattr__(self, name):
        fn = getattr(_losses, name)

        def call(*args, **kwargs):
            static = {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str))}
            dyn = {k: v for k, v in kwargs.items() if k not in static}
            return jax.jit(functools.partial(fn, **static))(*args, **dyn)
        return call


losses = _Jitted()

RTOL = 1e-5


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_next_token_targets():
    ids = np.array([[5, 6, 7, 8, 9]])
    reply = np.array([[0, 0, 1, 1, 1]])
    t, m = losses.next_token_targets(ids, reply)
    np.testing.assert_array_equal(t, [[6, 7, 8, 9, 0]])
    # Position 1 predicts the first reply token (7); the last position predicts nothing.
    np.testing.assert_array_equal(m, [[0, 1, 1, 1, 0]])


def test_distill_ce(rng):
    b, t, v = 3, 6, 11
    logits = rng.normal(size=(b, t, v)).astype(np.float32) * 3
    targets = rng.integers(0, v, (b, t))
    mask = (rng.random((b, t)) > 0.4).astype(np.float32)
    mask[0] = 0  # a row without reply tokens contributes nothing
    logits[1, 2, targets[1, 2]] = 50.0  # one confidently correct prediction
    mask[1, 2] = 1
    loss, sums = losses.distill_ce(logits, {"targets": targets, "loss_mask": mask})
    lp = np_log_softmax(logits.astype(np.float64))
    nll = -np.take_along_axis(lp, targets[..., None], -1)[..., 0]
    expect = (nll * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(loss), expect, rtol=RTOL)
    correct = ((logits.argmax(-1) == targets) * mask).sum()
    m = _losses.finalize_metrics(sums)
    np.testing.assert_allclose(float(m["token_accuracy"]), correct / mask.sum(), rtol=RTOL)
    assert float(m["num_tokens"]) == mask.sum()
    assert correct >= 1
    # Normalising by a larger batch's count scales the loss: the microbatch contract.
    loss2, _ = losses.distill_ce(logits, {"targets": targets, "loss_mask": mask},
                                 norm={"tokens": 2 * mask.sum()})
    np.testing.assert_allclose(float(loss2), expect / 2, rtol=RTOL)


def np_kl_aligned(s_logits, s_mask, t_logits, t_mask, temp):
    total, count = 0.0, 0
    for b in range(s_logits.shape[0]):
        sp = np.flatnonzero(s_mask[b])
        tp = np.flatnonzero(t_mask[b])
        for k in range(min(len(sp), len(tp))):
            p_t = np_log_softmax(t_logits[b, tp[k]] / temp)
            p_s = np_log_softmax(s_logits[b, sp[k]] / temp)
            total += (np.exp(p_t) * (p_t - p_s)).sum() * temp ** 2
            count += 1
    return total / count, count


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_distill_kl(rng, temp):
    b, ts, tt, v = 2, 9, 7, 13
    s_logits = rng.normal(size=(b, ts, v)).astype(np.float32)
    t_logits = rng.normal(size=(b, tt, v)).astype(np.float32) * 2
    s_mask = np.zeros((b, ts), np.float32)
    t_mask = np.zeros((b, tt), np.float32)
    s_mask[0, 5:8] = 1
    t_mask[0, 2:5] = 1  # same reply, earlier in the (shorter) transcript prompt
    s_mask[1, [1, 4, 6, 8]] = 1
    t_mask[1, [0, 3, 6]] = 1  # one fewer: the extra student position is ignored
    loss, sums = losses.distill_kl(s_logits, t_logits,
                                   {"loss_mask": s_mask, "teacher_loss_mask": t_mask},
                                   temperature=temp)
    expect, count = np_kl_aligned(s_logits.astype(np.float64), s_mask,
                                  t_logits.astype(np.float64), t_mask, temp)
    np.testing.assert_allclose(float(loss), expect, rtol=RTOL)
    assert float(sums["kl_tokens"]) == count == 6
    norm = _losses.normalizers({"loss_mask": s_mask, "teacher_loss_mask": t_mask},
                               "distill_kl")
    assert float(norm["kl_tokens"]) == 6


def test_kl_zero_when_student_equals_teacher(rng):
    b, t, v = 2, 8, 10
    logits = rng.normal(size=(b, t, v)).astype(np.float32) * 4
    mask = (rng.random((b, t)) > 0.3).astype(np.float32)
    # Teacher sequence: the same reply positions shifted right by 3 (a longer prompt).
    t_logits = np.concatenate([rng.normal(size=(b, 3, v)).astype(np.float32), logits], 1)
    t_mask = np.concatenate([np.zeros((b, 3), np.float32), mask], 1)
    loss, sums = losses.distill_kl(logits, t_logits,
                                   {"loss_mask": mask, "teacher_loss_mask": t_mask})
    assert abs(float(loss)) < 1e-6
    assert float(sums["kl_tokens"]) == mask.sum()
    # ... and positive for a different student.
    loss2, _ = losses.distill_kl(logits + rng.normal(size=logits.shape).astype(np.float32),
                                 t_logits, {"loss_mask": mask, "teacher_loss_mask": t_mask})
    assert float(loss2) > 1e-3


def test_distill_kl_with_ce(rng):
    b, t, v = 2, 5, 7
    logits = rng.normal(size=(b, t, v)).astype(np.float32)
    targets = rng.integers(0, v, (b, t))
    mask = np.ones((b, t), np.float32)
    batch = {"loss_mask": mask, "teacher_loss_mask": mask, "targets": targets}
    loss, sums = losses.distill_kl(logits, logits, batch, ce_weight=0.5)
    ce, _ = losses.distill_ce(logits, batch)
    np.testing.assert_allclose(float(loss), 0.5 * float(ce), rtol=RTOL, atol=1e-7)
    assert "loss_ce" in _losses.finalize_metrics(sums)


def test_emotion_ce(rng):
    b, t, v, c = 4, 5, 9, 5
    logits = rng.normal(size=(b, t, v)).astype(np.float32)
    targets = rng.integers(0, v, (b, t))
    mask = (rng.random((b, t)) > 0.5).astype(np.float32)
    ser = rng.normal(size=(b, c)).astype(np.float32)
    labels = np.array([2, -1, 0, 4])  # row 1 is an unlabelled (2b) row
    attrs = rng.normal(size=(b, 3)).astype(np.float32)
    attr_t = rng.normal(size=(b, 3)).astype(np.float32)
    attr_mask = np.array([1, 1, 0, 1], np.float32)
    batch = {"targets": targets, "loss_mask": mask, "emotion_label": labels,
             "attributes": attr_t, "attr_mask": attr_mask}
    loss, sums = losses.emotion_ce(logits, ser, batch, attrs, ser_weight=0.8, attr_weight=0.3)

    lp = np_log_softmax(logits.astype(np.float64))
    ce = (-np.take_along_axis(lp, targets[..., None], -1)[..., 0] * mask).sum() / mask.sum()
    sl = np_log_softmax(ser.astype(np.float64))
    lab = labels >= 0
    ser_ce = -sl[lab, labels[lab]].mean()
    mse = (((attrs - attr_t) ** 2).mean(-1) * attr_mask).sum() / attr_mask.sum()
    np.testing.assert_allclose(float(loss), ce + 0.8 * ser_ce + 0.3 * mse, rtol=RTOL)
    m = _losses.finalize_metrics(sums)
    np.testing.assert_allclose(float(m["loss_ser"]), ser_ce, rtol=RTOL)
    acc = (ser.argmax(-1)[lab] == labels[lab]).mean()
    np.testing.assert_allclose(float(m["ser_accuracy"]), acc, rtol=RTOL)
    np.testing.assert_allclose(float(m["loss_attr"]), mse, rtol=RTOL)
    assert float(m["num_ser_examples"]) == 3
    # ser_weight 0 (the release's setting) leaves only the CE term but still reports SER.
    loss0, sums0 = losses.emotion_ce(logits, ser, batch, attrs, ser_weight=0.0)
    np.testing.assert_allclose(float(loss0), ce, rtol=RTOL)
    assert "loss_ser" in _losses.finalize_metrics(sums0)
    with pytest.raises(ValueError, match="attr_weight"):
        losses.emotion_ce(logits, ser, {"targets": targets, "loss_mask": mask}, None,
                          attr_weight=1.0)


def test_unit_ce(rng):
    b, s, v = 2, 7, 6
    logits = rng.normal(size=(b, s, v)).astype(np.float32)
    targets = rng.integers(0, v, (b, s))
    mask = np.array([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 0]], np.float32)
    loss, _ = losses.unit_ce(logits, targets, mask)
    lp = np_log_softmax(logits.astype(np.float64))
    expect = (-np.take_along_axis(lp, targets[..., None], -1)[..., 0] * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(loss), expect, rtol=RTOL)


def test_microbatch_sums_are_exact(rng):
    """Sum over microbatches of losses normalised by whole-batch counts = full-batch loss."""
    b, t, v = 6, 5, 8
    logits = rng.normal(size=(b, t, v)).astype(np.float32)
    ser = rng.normal(size=(b, 5)).astype(np.float32)
    batch = {"targets": rng.integers(0, v, (b, t)),
             "loss_mask": (rng.random((b, t)) > 0.5).astype(np.float32),
             "emotion_label": np.array([0, -1, 3, 2, -1, 1])}
    full, _ = losses.emotion_ce(logits, ser, batch)
    norm = _losses.normalizers(batch, "emotion_ce")
    parts = 0.0
    for rows in ([0, 3], [1, 4], [2, 5]):
        mb = {k: v[rows] for k, v in batch.items()}
        parts += float(losses.emotion_ce(logits[rows], ser[rows], mb, norm=norm)[0])
    np.testing.assert_allclose(parts, float(full), rtol=RTOL)


def test_out_of_vocab_ids_at_masked_positions_stay_finite():
    """Prompt positions hold added placeholder ids >= vocab size; the loss ignores them and
    must not turn NaN (regression: a NaN gather times a zero mask is NaN)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 10)).astype(np.float32)
    targets = np.array([[10, 11, 3, 4, 0, 0], [12, 2, 5, 1, 0, 0]], np.int32)
    mask = np.array([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0]], np.float32)
    s = _losses.token_ce_sums(logits, targets, mask)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -sum(logp[b, t, targets[b, t]] for b, t in zip(*np.nonzero(mask)))
    np.testing.assert_allclose(float(s["ce_sum"]), want, rtol=1e-5)
    assert float(s["tokens"]) == 5
