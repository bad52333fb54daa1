"""freezeempath-jax: JAX/Flax FreezeEmpath - an empathetic spoken chatbot around a frozen LLM."""

__version__ = "0.1.0"
