"""Tokenizer loading and the chat prompt of DESIGN.md section 4.

The prompt is the chat template applied to the system prompt and the user template of the
config; `<speech>` and `<emotion>` in it are expanded to `num_speech_tokens` copies of
`config.speech_token_id` and Q copies of `config.emotion_token_id`, so prompt shapes are
static and the model splices embeddings by id. Text between placeholders is tokenized
piece by piece, exactly as a tokenizer that knows the placeholders as special tokens would.
"""

from __future__ import annotations

import os
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np

from freezeempath_jax.checkpoints.errors import CheckpointError, Problem

SPEECH = "<speech>"
EMOTION = "<emotion>"
PLACEHOLDERS = (SPEECH, EMOTION)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")

# ChatML, the layout of Qwen's template, for tokenizers that carry no chat template.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


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
    from freezeempath_jax.checkpoints import gguf_tokenizer as gt

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


def chat_text(tokenizer, config, user_text: Optional[str] = None) -> str:
    """The prompt text: system prompt + user turn (the config's user template by default),
    formatted with the tokenizer's chat template (ChatML when it has none)."""
    messages = [{"role": "system", "content": config.system_prompt},
                {"role": "user", "content": config.user_template if user_text is None
                 else user_text}]
    template = None if getattr(tokenizer, "chat_template", None) else CHATML
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         chat_template=template)


def build_prompt_ids(tokenizer, config, num_speech_tokens: Optional[int] = None,
                     num_emotion_tokens: Optional[int] = None,
                     user_text: Optional[str] = None) -> np.ndarray:
    """int32 prompt ids [T] with `<speech>` expanded to `num_speech_tokens` copies of
    `config.speech_token_id` and `<emotion>` to `num_emotion_tokens` copies of
    `config.emotion_token_id` (defaults: `config.num_speech_tokens`, `config.emotion.num_queries`).
    """
    s = config.num_speech_tokens if num_speech_tokens is None else num_speech_tokens
    q = config.emotion.num_queries if num_emotion_tokens is None else num_emotion_tokens
    text = chat_text(tokenizer, config, user_text)
    expand = {SPEECH: [config.speech_token_id] * s, EMOTION: [config.emotion_token_id] * q}
    ids: List[int] = []
    for piece in re.split("(" + "|".join(re.escape(p) for p in PLACEHOLDERS) + ")", text):
        if piece in expand:
            ids += expand[piece]
        elif piece:
            ids += tokenizer.encode(piece, add_special_tokens=False)
    return np.asarray(ids, np.int32)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, length: Optional[int] = None
             ) -> Tuple[np.ndarray, np.ndarray]:
    """Left-pads a batch: (ids [B, T] int32, attention_mask [B, T] int32 with 1 = real).

    length: pad to this many positions (static shapes); default the longest row.
    """
    longest = max((len(s) for s in sequences), default=0)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"a sequence has {longest} tokens, more than length={length}")
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, length - len(s):] = np.asarray(s, np.int32)
            mask[i, length - len(s):] = 1
    return ids, mask
