"""Program shapes that XLA's CPU backend runs fast; the math is unchanged (float round-off only).

Two things cost most of a CPU train step when written the natural way (docs/benchmarks.md, "On a
CPU, against PyTorch", says what the CPU paths do and measures them):

- A projection `einsum("bld,df->blf")` contracts over two axes (b, l) in its weight gradient.
  XLA canonicalises such a dot by physically transposing the [B*L, F] activation gradient first,
  a strided copy that took longer than the matmul itself (and "blnh,nhd->bld" made decoding
  transpose the o_proj kernel at every token). `flat_einsum` writes every projection as one 2-D
  matmul, so each dot of the forward and backward pass has a single contracting axis.
- Causal attention over a long sequence materialises [B, N, L, L] scores several times in the
  backward pass, half of them masked. `query_blocks` splits the queries into blocks that only see
  the keys up to their own end (every query still sees all the keys it may see, so each softmax
  row is computed whole, exactly as before), which skips most masked work and keeps the
  tensors small enough that XLA needs no transposes for the batched dots.

Both apply on the CPU backend only; other backends get the plain einsum / one block.
"""

import functools
import math

import jax
import jax.numpy as jnp

# Queries per attention block on the CPU, and the shortest sequence that is split at all. 64 was
# the fastest of 32/64/128/256 for the fwd+bwd pass at L=512 (2-core development CPU); below 256
# tokens one block is as fast and compiles to fewer ops.
QUERY_BLOCK = 64
MIN_BLOCKED_LENGTH = 256


def on_cpu() -> bool:
  return jax.default_backend() == "cpu"


def scan_unroll(n_layers: int) -> int:
  """How many layers of an `nn.scan` stack XLA sees unrolled per loop iteration: all of them on
  the CPU, one elsewhere. On the CPU a while loop over layers spends ~10% of a train step
  zero-filling, writing and re-reading the per-layer residual stacks (2-core development CPU); the
  parameter layout ("layers" stacked on axis 0) is the same either way."""
  return n_layers if on_cpu() else 1


def flat_einsum(equation: str, x: jax.Array, kernel: jax.Array, **kwargs) -> jax.Array:
  """`jnp.einsum(equation, x, kernel)` computed as one 2-D matmul on the CPU.

  Fits equations whose x is [tokens..., contracted...], whose kernel is [contracted..., out...]
  or [out..., contracted...], and whose output is [tokens..., out...] (every projection of the
  decoder: "bld,dnh->blnh", "blnh,nhd->bld", "bld,vd->blv", ...). The merges are reshapes of
  contiguous axes (free in row-major layout); anything else is a plain einsum.
  """
  flat = _as_matmul(equation) if on_cpu() else None
  if flat is None:
    return jnp.einsum(equation, x, kernel, **kwargs)
  n_tokens, n_contracted, kernel_contracted_first = flat
  tokens, out_shape = x.shape[:n_tokens], (kernel.shape[n_contracted:] if kernel_contracted_first
                                            else kernel.shape[:kernel.ndim - n_contracted])
  x_TxC = x.reshape(math.prod(tokens), -1)
  if kernel_contracted_first:
    y_TxO = jnp.einsum("tc,co->to", x_TxC, kernel.reshape(x_TxC.shape[1], -1), **kwargs)
  else:
    y_TxO = jnp.einsum("tc,oc->to", x_TxC, kernel.reshape(-1, x_TxC.shape[1]), **kwargs)
  return y_TxO.reshape(*tokens, *out_shape)


@functools.lru_cache(maxsize=None)
def _as_matmul(equation: str):
  """(token axes, contracted axes, kernel lists its contracted axes first) or None."""
  if "." in equation or "->" not in equation:
    return None
  inputs, out = equation.replace(" ", "").split("->")
  if inputs.count(",") != 1:
    return None
  x_sub, k_sub = inputs.split(",")
  contracted = "".join(c for c in x_sub if c in k_sub and c not in out)
  tokens = x_sub[:len(x_sub) - len(contracted)]
  kept = "".join(c for c in k_sub if c not in contracted)
  if (len(set(equation) - set(",->")) != len(tokens + contracted + kept)
      or x_sub != tokens + contracted or out != tokens + kept):
    return None
  if k_sub == contracted + kept:
    return len(tokens), len(contracted), True
  if k_sub == kept + contracted:
    return len(tokens), len(contracted), False
  return None


def query_blocks(length: int, keys: int) -> list[tuple[int, int]]:
  """[(start, end)] query blocks for causal self-attention: block [start, end) needs keys [0, end).

  One block (the whole sequence) off the CPU, for cross/cached attention (keys != length) and for
  short sequences.
  """
  if not on_cpu() or keys != length or length < MIN_BLOCKED_LENGTH:
    return [(0, length)]
  return [(a, min(a + QUERY_BLOCK, length)) for a in range(0, length, QUERY_BLOCK)]
