"""Speech decoder: streaming (N, M) layout on hand-worked examples, the fusion of LLM states
with token embeddings against a torch reference, and the training forward against
`transformers.Qwen2ForCausalLM` fed the release-style interleaved sequence.

float32 throughout; max abs error <= 1e-5 for fuse() and the mean loss, <= 2e-5 on logits
(magnitude up to ~14) and per-token losses of the two-layer LM (measured ~4e-6).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from freezeempath_jax.models import streaming
from freezeempath_jax.models.configs import LMConfig, SpeechDecoderConfig
from freezeempath_jax.models.speech_decoder import SpeechDecoder
from freezeempath_jax.models.streaming import EOS, SEP, TEXT, UNIT

# ---------------------------------------------------------------------------------------------
# Layout on hand-worked examples (N = 3, M = 5 unless stated).


def _seq(layout, row=0):
    return streaming.describe(layout, row).split()


def test_interleaved_example_from_docstring():
    lay = streaming.build_layout([4], [7], 3, 5, seq_len=16)
    assert _seq(lay) == "t0 t1 t2 u0 u1 u2 u3 u4 t3 SEP u5 u6 EOS".split()
    # Loss on the position *before* each unit token (text t2 predicts u0, SEP predicts u5).
    want = [0, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0]
    np.testing.assert_array_equal(lay.loss_mask[0], want)
    np.testing.assert_array_equal(lay.attention_mask[0], [1] * 13 + [0] * 3)
    assert lay.lengths.tolist() == [13]


def test_fallback_when_fewer_unit_chunks():
    # unit side [u0 u1 u2 EOS] is 1 chunk, text side [t0 t1 t2][t3 SEP] is 2: all text first.
    lay = streaming.build_layout([4], [3], 3, 5, seq_len=9)
    assert _seq(lay) == "t0 t1 t2 t3 SEP u0 u1 u2 EOS".split()
    np.testing.assert_array_equal(lay.loss_mask[0], [0, 0, 0, 0, 1, 1, 1, 1, 0])


def test_equal_chunk_counts_interleave():
    # 2 text chunks, 2 unit chunks (the 2nd only EOS): interleaved, not the fallback.
    lay = streaming.build_layout([4], [5], 3, 5, seq_len=11)
    assert _seq(lay) == "t0 t1 t2 u0 u1 u2 u3 u4 t3 SEP EOS".split()


def test_exact_chunk_tail():
    # Text side of exactly 2N and unit side of exactly 2M: no partial chunks anywhere.
    lay = streaming.build_layout([5], [9], 3, 5, seq_len=16)
    assert _seq(lay) == "t0 t1 t2 u0 u1 u2 u3 u4 t3 t4 SEP u5 u6 u7 u8 EOS".split()
    # Text a multiple of N: the last text "chunk" is SEP alone.
    lay = streaming.build_layout([3], [9], 3, 5, seq_len=14)
    assert _seq(lay) == "t0 t1 t2 u0 u1 u2 u3 u4 SEP u5 u6 u7 u8 EOS".split()


def test_last_text_chunk_takes_every_remaining_unit():
    # 4 unit chunks but 2 text chunks: unit chunks 1..3 all follow the last text chunk.
    lay = streaming.build_layout([4], [17], 3, 5, seq_len=23)
    want = "t0 t1 t2 u0 u1 u2 u3 u4 t3 SEP".split() + [f"u{i}" for i in range(5, 17)] + ["EOS"]
    assert _seq(lay) == want


def test_empty_text_and_other_nm():
    lay = streaming.build_layout([0], [2], 3, 5, seq_len=4)
    assert _seq(lay) == "SEP u0 u1 EOS".split()
    lay = streaming.build_layout([5], [4], 2, 2, seq_len=11)
    # text side [t0 t1][t2 t3][t4 SEP], unit side [u0 u1][u2 u3][EOS]
    assert _seq(lay) == "t0 t1 u0 u1 t2 t3 u2 u3 t4 SEP EOS".split()


def test_truncation_at_max_length():
    lay = streaming.build_layout([4, 4], [7, 3], 3, 5, max_length=8, seq_len=10)
    assert _seq(lay, 0) == "t0 t1 t2 u0 u1 u2 u3 u4".split()
    assert _seq(lay, 1) == "t0 t1 t2 t3 SEP u0 u1 u2".split()
    assert lay.lengths.tolist() == [8, 8]
    np.testing.assert_array_equal(lay.attention_mask, [[1] * 8 + [0] * 2] * 2)
    # The last kept position has nothing left to predict.
    np.testing.assert_array_equal(lay.loss_mask[0], [0, 0, 1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(lay.loss_mask[1], [0, 0, 0, 0, 1, 1, 1, 0, 0, 0])
    # Default seq_len is max_length.
    assert streaming.build_layout([4], [7], 3, 5, max_length=8).kind.shape == (1, 8)


def test_targets_are_next_unit_tokens():
    sep, eos, off = 100, 7, 200
    lay = streaming.build_layout([4, 4], [7, 3], 3, 5, seq_len=14)
    units = np.asarray([[10, 11, 12, 13, 14, 15, 16], [20, 21, 22, 0, 0, 0, 0]])
    tok, tgt = streaming.assemble_tokens(lay, jnp.asarray(units), sep_token_id=sep,
                                         eos_token_id=eos, unit_offset=off)
    tok, tgt = np.asarray(tok), np.asarray(tgt)
    row0 = [0, 0, 0, 210, 211, 212, 213, 214, 0, sep, 215, 216, eos, 0]
    np.testing.assert_array_equal(tok[0], row0)
    np.testing.assert_array_equal(tok[1], [0, 0, 0, 0, sep, 220, 221, 222, eos, 0, 0, 0, 0, 0])
    for r in range(2):
        for p in range(13):
            if lay.kind[r, p + 1] in (UNIT, EOS):
                assert lay.loss_mask[r, p] == 1 and tgt[r, p] == tok[r, p + 1]
            else:
                assert lay.loss_mask[r, p] == 0


@pytest.mark.parametrize("n,m", [(3, 15), (3, 5), (1, 1), (4, 2)])
def test_layout_properties_random_lengths(n, m):
    rng = np.random.default_rng(n * 31 + m)
    for _ in range(50):
        nt, nu = int(rng.integers(0, 30)), int(rng.integers(0, 90))
        order = streaming.layout_order(nt, nu, n, m)
        assert len(order) == nt + nu + 2
        kinds = [k for k, _ in order]
        assert [i for k, i in order if k == TEXT] == list(range(nt))
        assert [i for k, i in order if k == UNIT] == list(range(nu))
        assert kinds.count(SEP) == 1 and kinds[-1] == EOS
        assert kinds.index(SEP) > max([p for p, k in enumerate(kinds) if k == TEXT], default=-1)
        interleaved = -(-(nu + 1) // m) >= -(-(nt + 1) // n)
        if not interleaved:
            assert kinds == [TEXT] * nt + [SEP] + [UNIT] * nu + [EOS]
        else:
            # Every unit before the last text chunk sits in a full chunk of M right after a
            # full text chunk of N.
            runs, prev = [], None
            for k in kinds:
                side = "t" if k in (TEXT, SEP) else "u"
                if side != prev:
                    runs.append([side, 0])
                    prev = side
                runs[-1][1] += 1
            assert [r[0] for r in runs] == ["t", "u"] * (len(runs) // 2)
            for side, count in runs[:-2]:
                assert count == (n if side == "t" else m)


def _simulate(schedule, nt, nu, m):
    """Sequence a generator produces following `schedule` when the units keep coming."""
    out, u = [], 0
    for step in schedule:
        out += [(TEXT, i) for i in range(step.text_start, step.text_end)]
        if step.sep:
            out.append((SEP, 0))
            out += [(UNIT, i) for i in range(u, nu)] + [(EOS, 0)]
        else:
            take = min(step.max_units, nu - u)
            out += [(UNIT, i) for i in range(u, u + take)]
            u += take
    return out


@pytest.mark.parametrize("n,m", [(3, 15), (3, 5), (2, 2)])
def test_inference_schedule_reproduces_training_layout(n, m):
    for nt in range(0, 14):
        sched = streaming.inference_schedule(nt, n, m, max_units=1024)
        assert sched[-1].sep and sched[-1].max_units == 1024
        assert all(not s.sep and s.max_units == m and s.text_end - s.text_start == n
                   for s in sched[:-1])
        nu = (nt // n) * m + 7  # enough units that training interleaves
        assert _simulate(sched, nt, nu, m) == streaming.layout_order(nt, nu, n, m)
        # The online rule gives the same steps.
        steps, fed = [], 0
        while True:
            st = streaming.next_step(fed, nt, True, n, m, 1024)
            steps.append(st)
            fed = st.text_end
            if st.sep:
                break
        assert steps == sched
    assert streaming.next_step(0, n - 1, False, n, m) is None


def test_parse_stream_params():
    assert streaming.parse_stream_params("(3,15)") == (3, 15)
    assert streaming.parse_stream_params(" ( 2, 4 ) ") == (2, 4)
    for bad in ["(3)", "3,x", "(0,5)", "__import__('os')"]:
        with pytest.raises(ValueError):
            streaming.parse_stream_params(bad)


# ---------------------------------------------------------------------------------------------
# Model parity.

H_LLM, TEXT_VOCAB, UNITS = 24, 40, 16
LM = LMConfig(vocab_size=TEXT_VOCAB + 1 + UNITS, hidden_size=32, intermediate_size=48,
              num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0,
              rms_norm_eps=1e-6, qkv_bias=True, tie_embeddings=True)


def _config(proj_type="linear", gate=False, add_tok=True, n=3, m=5, max_length=2048):
    return SpeechDecoderConfig(lm=LM, proj_type=proj_type, ffn_dim=20,
                               add_token_embeddings=add_tok, gate_fusion=gate, stream_n=n,
                               stream_m=m, unit_vocab_size=UNITS, sep_token_id=TEXT_VOCAB,
                               unit_offset=TEXT_VOCAB + 1, eos_token_id=2,
                               max_length=max_length)


class TorchFusion(torch.nn.Module):
    """Release-style input projection + fusion (names as in the released checkpoint)."""

    def __init__(self, cfg: SpeechDecoderConfig, embed: torch.nn.Embedding):
        super().__init__()
        h = cfg.lm.hidden_size
        self.cfg, self.embed = cfg, embed
        if cfg.proj_type == "linear":
            self.input_proj = torch.nn.Linear(H_LLM, h)
        else:
            self.input_proj = torch.nn.Sequential(torch.nn.Linear(H_LLM, cfg.ffn_dim),
                                                  torch.nn.ReLU(),
                                                  torch.nn.Linear(cfg.ffn_dim, h))
        if cfg.gate_fusion:
            self.gate = torch.nn.Sequential(torch.nn.Linear(2 * h, h), torch.nn.Sigmoid())

    def forward(self, hidden_prev, ids):
        p = self.input_proj(hidden_prev)
        if not self.cfg.add_token_embeddings:
            return p
        e = self.embed(ids)
        if self.cfg.gate_fusion:
            g = self.gate(torch.cat([p, e], dim=-1))
            return p * g + e * (1 - g)
        return p + e


def _np(t):
    return t.detach().numpy()


def _lin(layer):
    return {"kernel": _np(layer.weight).T, "bias": _np(layer.bias)}


def fusion_params(ref: TorchFusion):
    cfg = ref.cfg
    if cfg.proj_type == "linear":
        p = {"input_proj": {"linear": _lin(ref.input_proj)}}
    else:
        p = {"input_proj": {"fc1": _lin(ref.input_proj[0]), "fc2": _lin(ref.input_proj[2])}}
    if cfg.gate_fusion:
        p["gate"] = _lin(ref.gate[0])
    return p


def hf_lm_params(model) -> dict:
    """Qwen2ForCausalLM state dict -> our CausalLM tree (docs/params.md, scanned layers)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    c = LM
    hd, n, k = c.head_dim, c.num_heads, c.num_kv_heads

    def stack(fmt, fn):
        return np.stack([fn(sd[fmt.format(i)]) for i in range(c.num_layers)])

    pre = "model.layers.{}."
    layers = {
        "input_norm": {"scale": stack(pre + "input_layernorm.weight", lambda w: w)},
        "post_attn_norm": {"scale": stack(pre + "post_attention_layernorm.weight", lambda w: w)},
        "attn": {
            "q_proj": {"kernel": stack(pre + "self_attn.q_proj.weight",
                                       lambda w: w.T.reshape(-1, n, hd)),
                       "bias": stack(pre + "self_attn.q_proj.bias", lambda b: b.reshape(n, hd))},
            "k_proj": {"kernel": stack(pre + "self_attn.k_proj.weight",
                                       lambda w: w.T.reshape(-1, k, hd)),
                       "bias": stack(pre + "self_attn.k_proj.bias", lambda b: b.reshape(k, hd))},
            "v_proj": {"kernel": stack(pre + "self_attn.v_proj.weight",
                                       lambda w: w.T.reshape(-1, k, hd)),
                       "bias": stack(pre + "self_attn.v_proj.bias", lambda b: b.reshape(k, hd))},
            "o_proj": {"kernel": stack(pre + "self_attn.o_proj.weight",
                                       lambda w: w.T.reshape(n, hd, -1))},
        },
        "mlp": {name: {"kernel": stack(pre + f"mlp.{name}.weight", lambda w: w.T)}
                for name in ("gate_proj", "up_proj", "down_proj")},
    }
    return {"embed_tokens": {"embedding": sd["model.embed_tokens.weight"]}, "layers": layers,
            "norm": {"scale": sd["model.norm.weight"]}}


def _hf_model(seed):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    hf_cfg = Qwen2Config(vocab_size=LM.vocab_size, hidden_size=LM.hidden_size,
                         intermediate_size=LM.intermediate_size,
                         num_hidden_layers=LM.num_layers, num_attention_heads=LM.num_heads,
                         num_key_value_heads=LM.num_kv_heads, rms_norm_eps=LM.rms_norm_eps,
                         rope_theta=LM.rope_theta, tie_word_embeddings=True,
                         attn_implementation="eager")
    model = Qwen2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        # Larger than HF's 0.02 init so attention, MLP and logits (order 1-10) all matter;
        # non-trivial norms and biases.
        for name, prm in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                prm.add_(0.1 * torch.randn_like(prm))
            elif "embed_tokens" in name:
                prm.mul_(20.0)
            else:
                prm.mul_(5.0)
    return model


@pytest.mark.parametrize("proj_type,gate,add_tok", [
    ("linear", False, True), ("linear", True, True), ("ffn", False, True), ("ffn", True, True),
    ("linear", False, False)])
def test_fuse_matches_torch(proj_type, gate, add_tok):
    cfg = _config(proj_type, gate, add_tok)
    torch.manual_seed(7)
    embed = torch.nn.Embedding(LM.vocab_size, LM.hidden_size)
    ref = TorchFusion(cfg, embed).eval()
    with torch.no_grad():
        for prm in ref.parameters():
            prm.mul_(3.0)  # push the gate away from 0.5
    hidden = torch.randn(2, 6, H_LLM)
    ids = torch.randint(0, TEXT_VOCAB, (2, 6))
    params = fusion_params(ref)
    params["lm"] = {"embed_tokens": {"embedding": _np(embed.weight)}}
    model = SpeechDecoder(cfg, H_LLM)
    got = jax.jit(lambda p, h, i: model.apply({"params": p}, h, i, method=SpeechDecoder.fuse))(
        params, hidden.numpy(), ids.numpy())
    with torch.no_grad():
        want = ref(hidden, ids).numpy()
    assert got.shape == (2, 6, LM.hidden_size)
    assert np.max(np.abs(np.asarray(got) - want)) <= 1e-5


def release_stream_inputs(text_reps, unit_lists, sep_emb, embed, cfg, n, m):
    """The release's interleaving written as an explicit loop over chunks (torch), padded
    right and cut at max_length; labels -100 on text."""
    embeds, labels = [], []
    for rep, units in zip(text_reps, unit_lists):
        ids = torch.tensor([cfg.unit_offset + u for u in units] + [cfg.eos_token_id])
        t_side = torch.cat([rep, sep_emb[None]], dim=0)
        u_emb = embed(ids)
        t_chunks = [t_side[i:i + n] for i in range(0, len(t_side), n)]
        u_chunks = [i for i in range(0, len(ids), m)]
        if len(u_chunks) < len(t_chunks):
            embeds.append(torch.cat([t_side, u_emb]))
            labels.append(torch.cat([torch.full((len(t_side),), -100), ids]))
            continue
        e_parts, l_parts = [], []
        for i, chunk in enumerate(t_chunks):
            e_parts.append(chunk)
            l_parts.append(torch.full((len(chunk),), -100))
            stop = (i + 1) * m if i < len(t_chunks) - 1 else len(ids)
            e_parts.append(u_emb[i * m:stop])
            l_parts.append(ids[i * m:stop])
        embeds.append(torch.cat(e_parts))
        labels.append(torch.cat(l_parts))
    lengths = [min(len(e), cfg.max_length) for e in embeds]
    x = torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True)[:, :cfg.max_length]
    y = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True,
                                        padding_value=-100)[:, :cfg.max_length]
    mask = (torch.arange(x.shape[1])[None] < torch.tensor(lengths)[:, None]).long()
    return x, y, mask


@pytest.mark.parametrize("proj_type,gate", [("linear", False), ("ffn", True)])
def test_training_forward_matches_transformers_qwen2(proj_type, gate):
    n, m, max_length = 3, 5, 24
    cfg = _config(proj_type, gate, True, n, m, max_length)
    hf = _hf_model(seed=11)
    ref = TorchFusion(cfg, hf.get_input_embeddings()).eval()
    # Example 0 interleaves, 1 falls back, 2 is cut at max_length (6 + 20 + 2 = 28 > 24).
    text_lengths, unit_lengths = [4, 4, 6], [7, 3, 20]
    b, t_max, u_max = 3, 8, 22
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(b, t_max, H_LLM, generator=g)
    text_ids = torch.randint(0, TEXT_VOCAB, (b, t_max), generator=g)
    unit_ids = torch.randint(0, UNITS, (b, u_max), generator=g)

    with torch.no_grad():
        fused = ref(hidden, text_ids)
        reps = [fused[r, :text_lengths[r]] for r in range(b)]
        units = [unit_ids[r, :unit_lengths[r]].tolist() for r in range(b)]
        sep = hf.get_input_embeddings()(torch.tensor(cfg.sep_token_id))
        x, labels, mask = release_stream_inputs(reps, units, sep, hf.get_input_embeddings(),
                                                cfg, n, m)
        out = hf(inputs_embeds=x, attention_mask=mask, labels=labels)
    want_logits = out.logits.numpy()
    shift_logits, shift_labels = out.logits[:, :-1], labels[:, 1:]
    want_tok = F.cross_entropy(shift_logits.reshape(-1, LM.vocab_size), shift_labels.reshape(-1),
                               ignore_index=-100, reduction="none").reshape(b, -1).numpy()

    params = fusion_params(ref)
    params["lm"] = hf_lm_params(hf)
    model = SpeechDecoder(cfg, H_LLM)
    layout = streaming.build_layout(text_lengths, unit_lengths, n, m, max_length=max_length)
    assert layout.kind.shape == (b, max_length) and x.shape[1] == max_length

    @jax.jit
    def run(p, h, ids, u, lay):
        res = model.apply({"params": p}, h, ids, u, lay, method=SpeechDecoder.unit_loss)
        xs, _ = model.apply({"params": p}, h, ids, u, lay, method=SpeechDecoder.layout_inputs)
        logits = model.apply({"params": p}, xs, attention_mask=lay.attention_mask).logits
        return res, xs, logits

    res, xs, logits = run(params, hidden.numpy(), text_ids.numpy(), unit_ids.numpy(), layout)
    valid = mask.numpy().astype(bool)
    # Same input sequence as the release's loop.
    assert np.max(np.abs(np.asarray(xs)[valid] - x.numpy()[valid])) <= 1e-5
    assert np.max(np.abs(np.asarray(logits)[valid] - want_logits[valid])) <= 2e-5
    assert np.abs(want_logits[valid]).max() > 3.0  # the comparison is not between near-zeros
    # Per-token CE: ours at position p equals the HF shifted loss for label p + 1.
    np.testing.assert_array_equal(np.asarray(res.loss_mask)[:, :-1],
                                  (shift_labels.numpy() != -100).astype(np.float32))
    assert np.max(np.abs(np.asarray(res.token_loss)[:, :-1] - want_tok)) <= 2e-5
    assert abs(float(res.loss) - float(out.loss)) <= 1e-5
    assert float(res.num_tokens) == float((shift_labels != -100).sum())


def test_padding_never_reaches_the_loss():
    # Changing text rows past each text length or units past each unit length must not change
    # anything: the layout gathers only real rows.
    cfg = _config("linear", True, True, 3, 5, 32)
    model = SpeechDecoder(cfg, H_LLM)
    layout = streaming.build_layout([2, 5], [6, 4], 3, 5, max_length=32, seq_len=20)
    rng = np.random.default_rng(0)
    h = rng.standard_normal((2, 7, H_LLM)).astype(np.float32)
    ids = rng.integers(0, TEXT_VOCAB, (2, 7))
    units = rng.integers(0, UNITS, (2, 9))
    hf = _hf_model(seed=2)  # random weights from torch: cheaper than compiling model.init
    params = fusion_params(TorchFusion(cfg, hf.get_input_embeddings()))
    params = {"params": {**params, "lm": hf_lm_params(hf)}}
    loss = jax.jit(lambda p, h, i, u: model.apply(p, h, i, u, layout,
                                                  method=SpeechDecoder.unit_loss).token_loss)
    base = np.asarray(loss(params, h, ids, units))
    h2, ids2, units2 = h.copy(), ids.copy(), units.copy()
    h2[0, 2:] += 3.0
    ids2[0, 2:] = (ids2[0, 2:] + 1) % TEXT_VOCAB
    units2[1, 4:] = (units2[1, 4:] + 1) % UNITS
    np.testing.assert_array_equal(np.asarray(loss(params, h2, ids2, units2)), base)
    h3 = h.copy()
    h3[0, 1] += 3.0  # a real row does matter
    assert np.max(np.abs(np.asarray(loss(params, h3, ids, units)) - base)) > 1e-4


def test_param_tree_and_config_errors():
    for proj_type, gate, want in [
            ("linear", False, {"lm", "input_proj"}),
            ("ffn", True, {"lm", "input_proj", "gate"})]:
        cfg = _config(proj_type, gate)
        model = SpeechDecoder(cfg, H_LLM)
        lay = streaming.build_layout([2], [3], 3, 5, seq_len=8)
        p = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 2, H_LLM)),
                                              jnp.zeros((1, 2), jnp.int32),
                                              jnp.zeros((1, 3), jnp.int32), lay,
                                              method=SpeechDecoder.unit_loss))["params"]
        from flax import linen as nn
        p = nn.meta.unbox(p)
        assert set(p) == want
        if proj_type == "linear":
            assert p["input_proj"]["linear"]["kernel"].shape == (H_LLM, LM.hidden_size)
        else:
            assert p["input_proj"]["fc1"]["kernel"].shape == (H_LLM, 20)
            assert p["input_proj"]["fc2"]["kernel"].shape == (20, LM.hidden_size)
            assert p["gate"]["kernel"].shape == (2 * LM.hidden_size, LM.hidden_size)
    bad = [(_config("conv"), "proj_type 'conv' is unknown"),
           (_config("linear", True, False), "gate_fusion needs add_token_embeddings"),
           (SpeechDecoderConfig(lm=LM, unit_vocab_size=UNITS, unit_offset=TEXT_VOCAB + 2),
            "units occupy ids")]
    for cfg, msg in bad:
        with pytest.raises(ValueError, match=msg):
            jax.eval_shape(lambda: SpeechDecoder(cfg, H_LLM).init(
                jax.random.key(0), jnp.zeros((1, 2, H_LLM)), jnp.zeros((1, 2), jnp.int32),
                method=SpeechDecoder.fuse))
