"""Moved: `python -m llm_jax.model.bench_matmul` (benchmarks sit beside what they measure)."""

from llm_jax import console

if __name__ == "__main__":
  console.moved("llm_jax.bench_matmul", "llm_jax.model.bench_matmul")
