"""llm_jax: train small decoder-only language models end to end in JAX."""

__version__ = "0.1.0"
