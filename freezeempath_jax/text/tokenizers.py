"""Every tokenizer the project uses, and the one adapter chat and training read them through.

- `load_tokenizer`: a transformers tokenizer from a local directory or a `.gguf` file (byte-level
  BPE vocabularies rebuilt without PyTorch, `gguf_tokenizer`);
- `ByteTokenizer`: UTF-8 bytes as ids, for random tiny models;
- `HFTokenizer`: a loaded transformers tokenizer with the model's placeholder ids;
- `make_tokenizer(model_config, spec)`: "byte" or a tokenizer path -> one of the two above;
- `Codec`: what generation needs of any of them (encode / decode, bos, pad, every EOS id).

The `<speech>` / `<emotion>` placeholders are inserted as ids by `prompts`, never as text.
"""

from __future__ import annotations

import os
from typing import List, Sequence, Tuple

from freezeempath_jax.text.prompts import PLACEHOLDERS

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def has_tokenizer(directory: str) -> bool:
    """Whether `directory` holds Hugging Face tokenizer files."""
    return os.path.isdir(directory) and any(
        os.path.isfile(os.path.join(directory, f)) for f in _TOKENIZER_FILES)


def load_tokenizer(path: str, add_placeholder_tokens: bool = True):
    """A transformers tokenizer from a local tokenizer directory or a `.gguf` file.

    GGUF tokenizers are rebuilt from the file's `tokenizer.ggml.*` metadata (tokens, merges,
    special ids, chat template; `tokenizer_from_gguf`). `<speech>`/`<emotion>` are added as special
    tokens when absent (they must never be split into pieces).
    """
    from transformers import AutoTokenizer

    path = os.fspath(path)
    ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf")) if os.path.isdir(
        path) else []
    if path.endswith(".gguf") and os.path.isfile(path):
        tok = tokenizer_from_gguf(path)
    elif has_tokenizer(path):
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    elif len(ggufs) == 1:
        tok = tokenizer_from_gguf(os.path.join(path, ggufs[0]))
    else:
        # imported here: the checkpoints package imports this module when it is initialised
        from freezeempath_jax.checkpoints.errors import CheckpointError, Problem
        raise CheckpointError(path, [Problem("file", file=path, detail=(
            "no tokenizer here: expected a directory with tokenizer.json / "
            "tokenizer_config.json or a .gguf file"))])
    if add_placeholder_tokens:
        add_placeholders(tok)
    return tok


def tokenizer_from_gguf(path: str):
    """A fast tokenizer from a GGUF file's metadata.

    Byte-level BPE vocabularies (GPT-2, Llama 3, Qwen2, SmolLM) are rebuilt here with the
    `tokenizers` library (`gguf_tokenizer`), without PyTorch; other kinds (sentencepiece)
    through transformers' GGUF conversion, which imports PyTorch.
    """
    from freezeempath_jax.text import gguf_tokenizer as gt

    kind = gt.gguf_tokenizer_kind(path)
    if kind == gt.BYTE_LEVEL:
        return gt.byte_level_tokenizer_from_gguf(path)
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            convert_gguf_tokenizer, get_gguf_tokenizer)
    except (ImportError, ModuleNotFoundError) as e:
        raise ImportError(
            f"{path}: its {kind!r} tokenizer is rebuilt by transformers' GGUF code, which needs "
            "PyTorch (pip install torch); or pass a tokenizer directory instead") from e
    arch, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(path)
    backend, extra = convert_gguf_tokenizer(arch, tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)


def add_placeholders(tokenizer, tokens: Sequence[str] = PLACEHOLDERS) -> List[int]:
    """Adds `tokens` as special tokens where the vocabulary lacks them; returns their ids."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing],
                             special_tokens=True)
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def placeholder_ids(tokenizer) -> Tuple[int, int]:
    """(speech id, emotion id) in the tokenizer, adding the tokens if needed."""
    s, e = add_placeholders(tokenizer)
    return s, e


class ByteTokenizer:
    """UTF-8 bytes as ids (`byte + offset`) for random tiny models.

    Ids below `offset` are specials: pad 0, bos 1, eos 2, and the model's speech / emotion
    placeholder ids (presets.TINY uses 3 and 4). The LLM vocabulary must hold offset + 256 ids.
    """

    def __init__(self, vocab_size: int, speech_token_id: int, emotion_token_id: int,
                 offset: int = 8):
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.speech_token_id, self.emotion_token_id = speech_token_id, emotion_token_id
        specials = {self.pad_id, self.bos_id, self.eos_id, speech_token_id, emotion_token_id}
        if len(specials) != 5 or max(specials) >= offset:
            raise ValueError(f"ByteTokenizer: special ids {sorted(specials)} must be distinct "
                             f"and below the byte offset {offset}")
        if offset + 256 > vocab_size:
            raise ValueError(f"ByteTokenizer needs a vocabulary of at least {offset + 256} ids "
                             f"(bytes + offset {offset}); the LLM has {vocab_size}")
        self.offset = offset

    def encode(self, text: str) -> List[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < self.offset + 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A transformers tokenizer (directory or .gguf file) with the model's placeholder ids.

    The placeholders may lie past the tokenizer's vocabulary (they are spliced, never
    embedded), so they are inserted as ids, never as text.
    """

    def __init__(self, path: str, speech_token_id: int, emotion_token_id: int):
        # the placeholders are inserted as ids, never as text: no tokens are added
        self.tok = load_tokenizer(path, add_placeholder_tokens=False)
        self.speech_token_id, self.emotion_token_id = speech_token_id, emotion_token_id
        self.eos_id = self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self.bos_id = self.tok.bos_token_id

    def encode(self, text: str) -> List[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def make_tokenizer(model, spec: str = "byte"):
    """`"byte"` -> ByteTokenizer over the LLM vocabulary of `model` (a FreezeEmpathConfig);
    anything else is a tokenizer path (`HFTokenizer`)."""
    if spec == "byte":
        return ByteTokenizer(model.llm.vocab_size, model.speech_token_id, model.emotion_token_id)
    return HFTokenizer(spec, model.speech_token_id, model.emotion_token_id)


class Codec:
    """What generation needs of a tokenizer: encode / decode, bos, pad and every EOS id.

    Accepts `ByteTokenizer` / `HFTokenizer` or a bare transformers tokenizer.
    Chat models end a reply with an end-of-turn token that may differ from the tokenizer's
    EOS (`<|im_end|>` vs `<|endoftext|>`): both stop generation.
    """

    END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>")

    def __init__(self, tokenizer):
        hf = getattr(tokenizer, "tok", None)
        if hf is None and hasattr(tokenizer, "convert_tokens_to_ids"):
            hf = tokenizer  # a bare transformers tokenizer
            self.encode = lambda text: list(hf.encode(text, add_special_tokens=False))
            self.decode = lambda ids: hf.decode(list(ids), skip_special_tokens=True)
            eos = hf.eos_token_id
            self.pad_id = hf.pad_token_id if hf.pad_token_id is not None else eos
            self.bos_id = hf.bos_token_id
        else:
            self.encode, self.decode = tokenizer.encode, tokenizer.decode
            eos, self.pad_id = tokenizer.eos_id, tokenizer.pad_id
            self.bos_id = getattr(tokenizer, "bos_id", None)
        ids = [] if eos is None else [int(eos)]
        if hf is not None:
            vocab = hf.get_vocab()
            ids += [int(vocab[t]) for t in self.END_TOKENS if t in vocab]
        if not ids:
            raise ValueError("the tokenizer defines no EOS token; chat cannot stop replies")
        self.eos_ids = tuple(dict.fromkeys(ids))
        if self.pad_id is None:
            self.pad_id = self.eos_ids[0]
