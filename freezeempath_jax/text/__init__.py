"""Text: tokenizers (byte, Hugging Face, GGUF), prompt formats and placeholder expansion, and
padding to static shapes. Training, chat, distillation and evaluation all build prompts here."""

from freezeempath_jax.text.padding import left_pad, round_up
from freezeempath_jax.text.prompts import (CHATML, EMOTION, PLACEHOLDERS, SPEECH, ChatFormat,
                                           PromptBuilder, PromptRecipe, chat_text, emotion_statement,
                                           expand_placeholders, teacher_content)
from freezeempath_jax.text.tokenizers import (ByteTokenizer, Codec, HFTokenizer,
                                              add_placeholders, has_tokenizer, load_tokenizer,
                                              make_tokenizer, placeholder_ids,
                                              tokenizer_from_gguf)

__all__ = [
    "left_pad", "round_up", "CHATML", "EMOTION", "PLACEHOLDERS", "SPEECH", "ChatFormat",
    "PromptBuilder", "PromptRecipe", "chat_text", "emotion_statement", "expand_placeholders", "teacher_content",
    "ByteTokenizer", "Codec", "HFTokenizer", "add_placeholders", "has_tokenizer",
    "load_tokenizer", "make_tokenizer", "placeholder_ids", "tokenizer_from_gguf",
]
