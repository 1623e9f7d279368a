"""The float32 matmuls of a small model's CPU step, in XLA and in PyTorch on one and on all cores.

  python -m llm_jax.model.bench_matmul [--dim=512 --mlp_dim=1408 --tokens=4096]

Why `train.bench --compare_torch` and `infer.bench --compare_torch` read what they read on a CPU: for each
shape that dominates a step of the 26M model (decoding's matrix-vector products at batch 1 and
8, training's large projections, attention's batched per-head matmuls), GFLOP/s of a jitted JAX
chain and of the same chain in torch with 1 thread and with all of this process's cores. Each is
the fastest of 5 blocks, each block a chain of matmuls through two alternating weights (so
nothing is hoisted and dispatch is amortized); the weights stay in cache, so the small shapes
read higher than inside a model that streams 100 MB of weights per token. Printed, never
asserted. Needs torch (tests/requirements.txt).
"""

import os
import time


from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import console

_DIM = flags.DEFINE_integer("dim", 512, "Model width.")
_MLP = flags.DEFINE_integer("mlp_dim", 1408, "MLP hidden width.")
_TOKENS = flags.DEFINE_integer("tokens", 4096, "Tokens of a training step's projections (batch x length).")

_CHAIN = 16  # matmuls per timed call


def _shapes(dim: int, mlp: int, tokens: int):
  """(label, batch, m, k, n): y[batch, m, n] = x[batch, m, k] @ w[batch, k, n], chained back."""
  return [
      ("decode, batch 1: [1, dim] x [dim, mlp]", 1, 1, dim, mlp),
      ("decode, batch 8: [8, dim] x [dim, mlp]", 1, 8, dim, mlp),
      (f"train projection: [{tokens}, dim] x [dim, mlp]", 1, tokens, dim, mlp),
      ("train attention: 16 x [256, 64] x [64, 288]", 16, 256, 64, 288),
  ]


def _best(fn, blocks: int = 5) -> float:
  """Seconds of the fastest of `blocks` calls of fn (after one untimed call)."""
  fn()
  times = []
  for _ in range(blocks):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def _jax_rate(batch, m, k, n) -> float:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, m, k)), jnp.float32)
  w1 = jnp.asarray(rng.standard_normal((batch, k, n)) / np.sqrt(k), jnp.float32)
  w2 = jnp.asarray(rng.standard_normal((batch, n, k)) / np.sqrt(n), jnp.float32)

  @jax.jit
  def chain(x, w1, w2):
    for _ in range(_CHAIN // 2):
      x = jnp.einsum("bmn,bnk->bmk", jnp.einsum("bmk,bkn->bmn", x, w1), w2)
    return x
  seconds = _best(lambda: chain(x, w1, w2).block_until_ready())
  return _CHAIN * 2 * batch * m * k * n / seconds


def _torch_rate(batch, m, k, n, threads: int) -> float:
  import torch  # pylint: disable=g-import-not-at-top
  before = torch.get_num_threads()
  torch.set_num_threads(threads)
  try:
    return _torch_chain_rate(torch, batch, m, k, n)
  finally:
    torch.set_num_threads(before)


def _torch_chain_rate(torch, batch, m, k, n) -> float:
  gen = torch.Generator().manual_seed(0)
  x = torch.randn(batch, m, k, generator=gen)
  w1, w2 = torch.randn(batch, k, n, generator=gen) / k ** 0.5, torch.randn(batch, n, k, generator=gen) / n ** 0.5

  def chain():
    y = x
    with torch.no_grad():
      for _ in range(_CHAIN // 2):
        y = torch.bmm(torch.bmm(y, w1), w2)
    return y
  seconds = _best(chain)
  return _CHAIN * 2 * batch * m * k * n / seconds


def main():
  import torch  # pylint: disable=g-import-not-at-top
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  all_threads = torch.get_num_threads()
  print(f"float32 GFLOP/s, fastest of 5 chains of {_CHAIN}; jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind}, torch {torch.__version__} ({cores} cores); load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
  print(f"{'shape':46} {'JAX':>7} {'torch 1':>8} {f'torch {all_threads}':>8} {'JAX/torch 1':>12} "
        f"{f'JAX/torch {all_threads}':>12}")
  for label, batch, m, k, n in _shapes(_DIM.value, _MLP.value, _TOKENS.value):
    ours = _jax_rate(batch, m, k, n)
    one = _torch_rate(batch, m, k, n, 1)
    every = _torch_rate(batch, m, k, n, all_threads)
    print(f"{label:46} {ours / 1e9:7.0f} {one / 1e9:8.0f} {every / 1e9:8.0f} {ours / one:11.2f}x "
          f"{ours / every:11.2f}x")


if __name__ == "__main__":
  console.cli(main)
