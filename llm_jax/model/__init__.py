"""The decoder model: config, layers, attention, KV cache and FLOP accounting."""

from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder, init_cache

__all__ = ["ModelConfig", "Decoder", "init_cache"]
