"""Text generation (`freezeempath_jax.sampling`) against a no-cache reference: greedy equals
step-by-step argmax of the full forward pass, batching with left padding changes nothing,
EOS stops rows, seeds reproduce, filters behave, and compiled code is reused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from freezeempath_jax.inference import sampling
from freezeempath_jax.models.causal_lm import CausalLM
from freezeempath_jax.models.configs import LMConfig

CFG = LMConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=6,
               num_kv_heads=2, head_dim=8, qkv_bias=True)
PAD = 0
MAX_NEW = 10


def random_params(cfg: LMConfig, seed: int = 0):
    """Random weights with spread-out logits, without compiling `init` (slow on CPU): shapes
    from `jax.eval_shape`, values from numpy."""
    shapes = jax.eval_shape(lambda: CausalLM(cfg).init(
        jax.random.key(0), input_ids=jnp.zeros((1, 1), jnp.int32)))["params"]
    from flax import linen as nn
    shapes = nn.meta.unbox(shapes)
    rng = np.random.RandomState(seed)

    def make(path, s):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.asarray(1.0 + 0.1 * rng.randn(*s.shape), s.dtype)
        std = 1.0 if "embedding" in name else 0.15
        return jnp.asarray(std * rng.randn(*s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(make, shapes)


@pytest.fixture(scope="module")
def params():
    return random_params(CFG)


@pytest.fixture(scope="module")
def batch():
    """Three prompts of lengths 9, 4, 7, left-padded to 9 (no pad id inside real tokens)."""
    rng = np.random.RandomState(1)
    lengths = [9, 4, 7]
    ids = np.full((3, 9), PAD, np.int32)
    for i, n in enumerate(lengths):
        ids[i, 9 - n:] = rng.randint(1, CFG.vocab_size, n)
    return ids, lengths


@pytest.fixture(scope="module")
def full_forward(params):
    """Jitted no-cache forward of a right-padded fixed-width sequence: logits [B, W, V]."""
    @jax.jit
    def fwd(ids, mask):
        out = CausalLM(CFG).apply({"params": params}, input_ids=ids, attention_mask=mask)
        return out.logits, out.hidden_states
    return fwd


def reference_greedy(full_forward, ids, n_new):
    """Step-by-step argmax, recomputing the whole sequence each step (no cache)."""
    b, t = ids.shape
    seq = np.zeros((b, t + n_new), np.int32)
    seq[:, :t] = ids
    mask = np.zeros((b, t + n_new), np.int32)
    mask[:, :t] = sampling.mask_from_pad(ids, PAD)
    out = np.zeros((b, n_new), np.int32)
    margins = []
    for i in range(n_new):
        logits, _ = full_forward(jnp.asarray(seq), jnp.asarray(mask))
        last = np.asarray(logits[:, t + i - 1])
        top2 = np.sort(last, axis=-1)[:, -2:]
        margins.append(top2[:, 1] - top2[:, 0])
        out[:, i] = last.argmax(-1)
        seq[:, t + i] = out[:, i]
        mask[:, t + i] = 1
    return out, np.min(margins)


@pytest.fixture(scope="module")
def greedy_ref(full_forward, batch):
    ids, _ = batch
    ref, margin = reference_greedy(full_forward, ids, MAX_NEW)
    # The comparison is meaningful only if float noise (~1e-6) cannot flip an argmax.
    assert margin > 1e-4, margin
    return ref


@pytest.fixture(scope="module")
def greedy_out(params, batch):
    ids, _ = batch
    return np.asarray(sampling.generate_text(CFG, params, ids, max_new_tokens=MAX_NEW,
                                             pad_token_id=PAD))


def test_greedy_equals_full_forward_argmax(greedy_out, greedy_ref):
    assert greedy_out.shape == (3, MAX_NEW)
    np.testing.assert_array_equal(greedy_out, greedy_ref)


def test_batched_equals_one_by_one_and_shapes_retrace(params, batch, greedy_out):
    """The most padded row, generated alone without padding, gives the same tokens; the new
    shape compiles each jitted function exactly once more."""
    ids, lengths = batch
    before = sampling.trace_counts()
    alone = sampling.generate_text(CFG, params, ids[1:2, 9 - lengths[1]:],
                                   max_new_tokens=MAX_NEW, pad_token_id=PAD)
    np.testing.assert_array_equal(np.asarray(alone)[0], greedy_out[1])
    after = sampling.trace_counts()
    assert after["prefill"] == before.get("prefill", 0) + 1
    assert after["decode"] == before.get("decode", 0) + 1


def test_eos_stops_rows_pads_and_ends_loop(params, batch, greedy_ref):
    """EOS given as a list: each row stops at its first EOS (kept), then pad; the loop
    stops as soon as every row is done."""
    ids, _ = batch
    eos = [int(greedy_ref[0, 2]), int(greedy_ref[1, 5]), int(greedy_ref[2, 4])]
    pad = 96
    before = sampling.trace_counts()
    state = sampling._run(CFG, params, jnp.asarray(ids), None, sampling.mask_from_pad(ids, PAD),
                          max_new_tokens=MAX_NEW,
                          sampling=sampling.make_sampling(0.0, eos_token_id=eos,
                                                          pad_token_id=pad),
                          seed=0, keep_hidden=False)
    out = np.asarray(state.tokens)
    stops = []
    for r in range(3):
        stop = next(i for i, x in enumerate(greedy_ref[r]) if x in eos)
        stops.append(stop)
        np.testing.assert_array_equal(out[r, :stop + 1], greedy_ref[r, :stop + 1])
        assert (out[r, stop + 1:] == pad).all(), out[r]
        assert int(state.lengths[r]) == stop
    assert np.asarray(state.done).all()
    assert int(state.step) == max(stops) + 1 < MAX_NEW  # ended early
    assert sampling.strip_after_eos(out, eos) == [greedy_ref[r, :s].tolist()
                                                  for r, s in enumerate(stops)]
    assert sampling.trace_counts() == before  # EOS and pad ids are data, not code


def test_seed_reproduces_and_differs(params, batch):
    ids, _ = batch
    kw = dict(max_new_tokens=MAX_NEW, temperature=1.3, top_k=40, top_p=0.95, pad_token_id=PAD)
    a = np.asarray(sampling.generate_text(CFG, params, ids, seed=7, **kw))
    b = np.asarray(sampling.generate_text(CFG, params, ids, seed=7, **kw))
    c = np.asarray(sampling.generate_text(CFG, params, ids, seed=8, **kw))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert a.min() >= 0 and a.max() < CFG.vocab_size


def test_top_k_one_equals_greedy(params, batch, greedy_out):
    ids, _ = batch
    out = sampling.generate_text(CFG, params, ids, max_new_tokens=MAX_NEW, temperature=1.0,
                                 top_k=1, seed=3, pad_token_id=PAD)
    np.testing.assert_array_equal(np.asarray(out), greedy_out)


def test_compiled_code_is_reused(params, batch):
    """Same shapes with other ids, seed, EOS ids, pad id, temperature, top-k and top-p: no
    new trace (those travel as arrays)."""
    ids, _ = batch
    other = np.asarray(ids).copy()
    other[:, -1] = (other[:, -1] + 1) % CFG.vocab_size + 1
    sampling.generate_text(CFG, params, ids, max_new_tokens=MAX_NEW, pad_token_id=PAD)
    sampling.generate_text(CFG, params, ids, max_new_tokens=MAX_NEW, temperature=1.0,
                           top_k=5, pad_token_id=PAD)
    before = sampling.trace_counts()
    sampling.generate_text(CFG, params, other, max_new_tokens=MAX_NEW, pad_token_id=PAD,
                           seed=123, eos_token_id=[3, 4])
    sampling.generate_text(CFG, params, other, max_new_tokens=MAX_NEW, pad_token_id=5,
                           temperature=0.5, top_p=0.5, top_k=9, seed=1)
    assert sampling.trace_counts() == before


def test_generate_from_embeds_tokens_and_producing_states(params, batch, full_forward,
                                                          greedy_out):
    """Embedding prompts give the same tokens; `hidden[:, i]` is the last-layer state at the
    position that produced token i (h_{t-1})."""
    ids, _ = batch
    mask = sampling.mask_from_pad(ids, PAD)
    emb = CausalLM(CFG).apply({"params": params}, jnp.asarray(ids), method=CausalLM.embed)
    out = sampling.generate_from_embeds(CFG, params, emb, mask, max_new_tokens=MAX_NEW)
    np.testing.assert_array_equal(np.asarray(out.tokens), greedy_out)
    assert not np.asarray(out.finished).any()
    np.testing.assert_array_equal(np.asarray(out.lengths), [MAX_NEW] * 3)
    seq = np.concatenate([ids, greedy_out], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(greedy_out)], axis=1)
    _, hidden = full_forward(jnp.asarray(seq), jnp.asarray(full_mask))
    t = ids.shape[1]
    want = np.asarray(hidden)[:, t - 1:t - 1 + MAX_NEW]
    err = np.abs(np.asarray(out.hidden) - want).max()
    assert err < 1e-4, err


def test_top_p_and_top_k_filters():
    """Filters on a known distribution: top-p keeps the smallest set reaching p, top-k the k
    most likely; a tiny top-p is greedy."""
    probs = np.array([[0.05, 0.5, 0.15, 0.3]], np.float32)
    logits = jnp.log(jnp.asarray(probs))
    keys = jax.random.split(jax.random.key(0), 400)

    def draw(keys, top_p, top_k):
        return jax.vmap(lambda k: sampling.sample_logits(logits, k, 1.0, top_k, top_p)[0])(keys)

    got_p = np.asarray(draw(keys, 0.7, None))  # 0.5 + 0.3 >= 0.7: ids {1, 3}
    assert set(got_p.tolist()) == {1, 3}
    assert 0.5 < np.mean(got_p == 1) < 0.75  # 0.5 / 0.8 = 0.625
    got_k = np.asarray(draw(keys, None, 3))  # ids {1, 3, 2}
    assert set(got_k.tolist()) == {1, 2, 3}
    assert set(np.asarray(draw(keys, 1e-6, None)).tolist()) == {1}


def test_bad_arguments_are_named(params):
    with pytest.raises(ValueError, match="top_p"):
        sampling.make_sampling(1.0, top_p=1.5)
    with pytest.raises(ValueError, match="left-padded|left padding"):
        sampling.generate_text(CFG, params, np.array([[5, 6, 0]]), max_new_tokens=2,
                               attention_mask=np.array([[1, 1, 0]]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampling.generate_text(CFG, params, np.array([[5, 6]]), max_new_tokens=0)


def _while_body_ops(hlo: str):
    """(opcode, element count) of every instruction in the body of the outermost while loop
    (the one the ENTRY computation runs) of compiled HLO text."""
    import re
    entry = hlo[hlo.index("\nENTRY "):]
    body = re.search(r"while\(.*?body=%?([\w.\-]+)", entry).group(1)
    start = re.search(r"^%?" + re.escape(body) + r" \(", hlo, re.M).start()
    block = hlo[start:hlo.index("\n}", start)]
    ops = [("while", 0)] * len(re.findall(r"\swhile\(", block))  # tuple-shaped
    for m in re.finditer(r"=\s+[a-z0-9]+\[([\d,]*)\]\S*\s+([\w\-]+)\(", block):
        dims = [int(d) for d in m.group(1).split(",") if d]
        ops.append((m.group(2), int(np.prod(dims)) if dims else 1))
    return ops


VOCAB_BIG, HIDDEN_BIG = 32000, 384


def test_decode_loop_reads_weights_without_copying_them():
    """Performance properties of the compiled decode loop (tied head, batch 1): the layers are
    unrolled (no inner loop slicing stacked weights and caches each step) and no instruction
    inside the `while_loop` body produces an array as large as the embedding (through
    `Embed.attend` in the unrolled loop, XLA copied the transposed [V, H] embedding every
    step)."""
    cfg = LMConfig(vocab_size=VOCAB_BIG, hidden_size=HIDDEN_BIG, intermediate_size=80, num_layers=2,
                   num_heads=6, num_kv_heads=2, head_dim=8, qkv_bias=True, tie_embeddings=True)
    p = random_params(cfg)
    b, t, n = 1, 8, 4  # batch 1: XLA's matrix-vector path is the one that copied
    samp = sampling.make_sampling()
    mode = sampling.mode_of(samp)
    state = sampling._prefill_jit(cfg, p, jnp.ones((b, t), jnp.int32), None,
                                  jnp.ones((b, t), jnp.int32),
                                  sampling.init_cache(cfg, b, t + n - 1), jax.random.key(0),
                                  sampling.rules_of(samp), max_new_tokens=n, mode=mode,
                                  keep_hidden=False)
    hlo = sampling._decode_jit.lower(cfg, p, state, jnp.int32(n), mode=mode).compile().as_text()
    ops = _while_body_ops(hlo)
    assert "while" not in [op for op, _ in ops], "decode step runs an inner (layer) loop"
    assert any(op == "fusion" or op == "dot" for op, _ in ops), ops[:20]  # parsed the body
    big = [(op, size) for op, size in ops if size >= cfg.vocab_size * cfg.hidden_size
           and op not in ("parameter", "get-tuple-element", "tuple", "bitcast")]
    assert not big, big
    # the same, for instructions of any computation that the loop body calls
    import re
    copies = [line.strip()[:120] for line in hlo.splitlines()
              if "/while/body/" in line
              and (m := re.search(r"=\s+f32\[([\d,]+)\]\S*\s+(copy|transpose)\(", line))
              and np.prod([int(d) for d in m.group(1).split(",")])
              >= cfg.vocab_size * cfg.hidden_size]
    assert not copies, copies


def test_scanned_and_unrolled_decode_loops_agree(params, batch):
    """The decode loop's two layer paths (unrolled: the default on one device; scanned: kept
    on fsdp-sharded meshes) give the same tokens and producing states from the same prefill."""
    ids, _ = batch
    mask = sampling.mask_from_pad(ids, PAD)
    samp = sampling.make_sampling(1.0, top_k=20)  # sampled: a divergence would show quickly
    mode = sampling.mode_of(samp)
    n = 8
    outs = {}
    for unrolled in (True, False):
        state = sampling._prefill_jit(CFG, params, jnp.asarray(ids), None, jnp.asarray(mask),
                                      sampling.init_cache(CFG, 3, 9 + n - 1),
                                      jax.random.key(3), sampling.rules_of(samp),
                                      max_new_tokens=n, mode=mode, keep_hidden=True)
        run = jax.jit(lambda p, s, u=unrolled: sampling.decode_until(CFG, p, s, n, mode, u))
        outs[unrolled] = run(params, state)
    a, b = outs[True], outs[False]
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.asarray(a.hidden), np.asarray(b.hidden), atol=1e-4)
    for k in ("k", "v"):
        np.testing.assert_allclose(np.asarray(a.cache[k]), np.asarray(b.cache[k]), atol=1e-4)
    assert int(a.step) == int(b.step) == n
