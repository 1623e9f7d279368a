"""Timing of generation: time to first token and decode tokens/s, what `python -m
llm_jax.infer.bench` prints and the GPU suite (train/bench_suite.py) records."""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.infer.generate import Generator
from llm_jax.infer.sampling import SamplingConfig
from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder


def measure_llm_jax(params, cfg: ModelConfig, *, batch_sizes=(1, 8), prompt_len: int = 64,
                    new_tokens: int = 128, seed: int = 0, mesh=None, rules=(), generator=None,
                    warmup: bool = True) -> list[dict]:
  """[{"batch", "ttft_s", "decode_tokens_per_s", "total_s"}] for greedy generation of random prompts.

  ttft_s: from the call to the first token on the host (prefill + one step). decode_tokens_per_s:
  batch * (new_tokens - 1) / (time of the last token - time of the first). `generator` reuses a
  Generator of these params between calls; warmup=False skips the untimed compiling run.
  """
  gen = generator or Generator(params, cfg, mesh=mesh, rules=rules)
  rng = np.random.default_rng(seed)
  sampling = SamplingConfig(temperature=0.0, max_new_tokens=new_tokens)
  results = []
  for batch in batch_sizes:
    prompts = rng.integers(0, cfg.vocab_size, (batch, prompt_len)).tolist()
    if warmup:
      gen.generate(prompts, sampling)  # compile these shapes
    stamps = []
    start = time.perf_counter()
    gen.generate(prompts, sampling, callback=lambda row, tok: row == 0 and stamps.append(time.perf_counter()))
    total = time.perf_counter() - start
    results.append({"batch": batch, "ttft_s": stamps[0] - start, "total_s": total,
                    "decode_tokens_per_s": batch * (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)})
  return results


def random_params(cfg: ModelConfig, seed: int = 0):
  ids = jnp.zeros((1, 1), jnp.int32)
  init = jax.jit(lambda rng: nn.unbox(Decoder(cfg).init(rng, ids, ids, ids + 1)["params"]))
  return init(jax.random.key(seed))
