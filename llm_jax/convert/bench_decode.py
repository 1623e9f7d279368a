"""Moved: `python -m llm_jax.infer.bench --compare_torch` (benchmarks sit beside what they measure)."""

from llm_jax import console

if __name__ == "__main__":
  console.moved("llm_jax.convert.bench_decode", "llm_jax.infer.bench --compare_torch")
