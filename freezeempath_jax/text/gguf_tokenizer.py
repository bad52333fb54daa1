"""Byte-level BPE tokenizers (GPT-2 / Llama-3 / Qwen2 / SmolLM style) rebuilt from a GGUF
file's metadata with the `tokenizers` library alone.

transformers can rebuild these too, but its GGUF code imports PyTorch, which the JAX install
does not have: the README's first command (`freezeempath-jax demo`, SmolLM2 from a GGUF file)
must run without it. The metadata (llama.cpp's key names) gives everything:

    tokenizer.ggml.model        "gpt2" for byte-level BPE (the kind built here)
    tokenizer.ggml.pre          which text-splitting rule the merges were learned with
    tokenizer.ggml.tokens       the vocabulary, already in GPT-2's printable byte alphabet
    tokenizer.ggml.merges       "a b" pairs, best first
    tokenizer.ggml.token_type   3 = control (special), 4 = user-defined (added, not special)
    tokenizer.ggml.*_token_id   bos / eos / unknown / padding
    tokenizer.chat_template     the Jinja chat template

Other tokenizer kinds (sentencepiece "llama", "t5", ...) go through transformers.
"""

from __future__ import annotations

import functools
from typing import Dict, List, Optional

from freezeempath_jax.checkpoints.errors import CheckpointError, Problem

BYTE_LEVEL = "gpt2"
CONTROL, USER_DEFINED = 3, 4

# Text-splitting rules before byte-level BPE, by `tokenizer.ggml.pre`. A vocabulary must be
# split the way its merges were learned. cl100k-style: contractions, letters with one leading
# non-letter, numbers in groups of up to three, punctuation runs, newlines, spaces.
_CL100K = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2: the same, but every digit on its own.
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {"llama3": _CL100K, "llama-v3": _CL100K, "llama-bpe": _CL100K, "smaug-bpe": _CL100K,
          "dbrx": _CL100K, "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2}
# Any other `pre` (e.g. "default", "gpt2", "smollm") keeps GPT-2's own split rule.


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable character map (printable Latin-1 bytes map to
    themselves, the other 68 to code points from 256 up), which byte-level vocabularies use."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _field(reader, key: str):
    """A GGUF metadata value as Python: str, int, bool, list of str / int, or None."""
    f = reader.fields.get(key)
    if f is None:
        return None
    kinds = [t.name for t in f.types]
    if kinds[0] == "ARRAY":
        if kinds[-1] == "STRING":
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    value = f.parts[f.data[0]]
    if kinds[0] == "STRING":
        return bytes(value).decode("utf-8")
    value = value.tolist()[0]
    return bool(value) if kinds[0] == "BOOL" else value


def gguf_tokenizer_kind(path: str) -> Optional[str]:
    """`tokenizer.ggml.model` of a GGUF file (None when it carries no tokenizer)."""
    from gguf import GGUFReader

    return _field(GGUFReader(path), "tokenizer.ggml.model")


def byte_level_tokenizer_from_gguf(path: str):
    """A `transformers.PreTrainedTokenizerFast` for a byte-level BPE GGUF file (no PyTorch).

    Control tokens become special tokens and user-defined ones added tokens, so neither is
    ever cut into pieces; bos / eos / unk / pad and the chat template come from the file.
    """
    from gguf import GGUFReader
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers,
                            processors)
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(path)
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != BYTE_LEVEL:
        raise CheckpointError(path, [Problem("architecture", key="tokenizer.ggml.model",
                                             file=path, expected=BYTE_LEVEL, actual=kind)])
    tokens: List[str] = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise CheckpointError(path, [Problem("missing", key="tokenizer.ggml.tokens/merges",
                                             file=path, detail="no byte-level vocabulary")])
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    spell = _byte_alphabet()
    alphabet = set(spell.values())
    # A token written outside the byte alphabet (rare) is respelled byte by byte.
    vocab = {(t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                     dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                     fuse_unk=False)
    tok = Tokenizer(bpe)
    split = SPLITS.get(_field(reader, "tokenizer.ggml.pre") or "")
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # Control tokens spelled outside the byte alphabet are llama.cpp mislabels; adding them
    # would grow the vocabulary past the model's, so they are left as they are.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab])

    def token(key):
        i = _field(reader, f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    kwargs = {name: token(key) for name, key in (
        ("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))}
    bos = kwargs["bos_token"]
    if _field(reader, "tokenizer.ggml.add_bos_token") and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1",
            special_tokens=[(bos, tokens.index(bos))])
    template = _field(reader, "tokenizer.chat_template")
    if template:
        kwargs["chat_template"] = template
    return PreTrainedTokenizerFast(tokenizer_object=tok,
                                   **{k: v for k, v in kwargs.items() if v is not None})
