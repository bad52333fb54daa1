"""Inference: jitted generation of text (`sampling`) and of text with streamed speech units
(`speech_generation`), the chat model (`chat`), loading a model for inference (`loading`) and
the `chat` command (`cli`). Nothing here imports `freezeempath_jax.train`."""

from freezeempath_jax.inference.chat import (ChatModel, Chatbot, Conversation, Reply, Turn)
from freezeempath_jax.inference.cli import read_items, run_chat
from freezeempath_jax.inference.loading import (load_chat_model, load_config_file,
                                                model_from_training_config)

__all__ = ["ChatModel", "Chatbot", "Conversation", "Reply", "Turn", "load_chat_model",
           "load_config_file", "model_from_training_config", "read_items", "run_chat"]
