"""Moved: `python -m llm_jax.train.bench` (benchmarks sit beside what they measure)."""

from llm_jax import console

if __name__ == "__main__":
  console.moved("llm_jax.bench", "llm_jax.train.bench")
