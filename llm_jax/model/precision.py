"""Matmuls whose result is float32 but whose gradients are computed in the compute dtype.

The logits are wanted in float32 (softmax and loss are), so their matmul accumulates and returns
float32. Autodiff would then transpose it with the float32 cotangent against a bfloat16 operand:
a mixed dot that XLA runs as a float32 matmul (TF32 on a GPU: half the bf16 rate), twice per
step, on the largest matmul of a big-vocabulary model. Here the cotangent is cast to the operands'
dtype first, so both backward matmuls are bf16 x bf16 with float32 accumulation, like every other
matmul of the model. With float32 operands this is jnp.einsum (as one 2-D matmul on the CPU, cpu.py).
"""

import functools

import jax
import jax.numpy as jnp

from llm_jax.model import cpu


def _transposed(eq: str) -> tuple[str, str]:
  """For a contraction "x,w->y": the einsums of dL/dx ("y,w->x") and dL/dw ("x,y->w")."""
  ins, out = eq.replace(" ", "").split("->")
  x, w = ins.split(",")
  return f"{out},{w}->{x}", f"{x},{out}->{w}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_f32_out(eq, x, w):
  return jnp.einsum(eq, x, w, preferred_element_type=jnp.float32)


def _fwd(eq, x, w):
  return _einsum_f32_out(eq, x, w), (x, w)


def _bwd(eq, residuals, ct):
  x, w = residuals
  dx_eq, dw_eq = _transposed(eq)
  ct = ct.astype(x.dtype)
  dx = jnp.einsum(dx_eq, ct, w, preferred_element_type=jnp.float32).astype(x.dtype)
  dw = jnp.einsum(dw_eq, x, ct, preferred_element_type=jnp.float32).astype(w.dtype)
  return dx, dw


_einsum_f32_out.defvjp(_fwd, _bwd)


def einsum_f32_out(eq: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """jnp.einsum(eq, x, w, preferred_element_type=float32) with backward matmuls in x's dtype.
  `eq` is a plain two-operand contraction (every index of x and w appears in the other or the
  output), e.g. "bld,dv->blv"."""
  if x.dtype == jnp.float32 and w.dtype == jnp.float32:  # plain autodiff; 2-D on the CPU
    return cpu.flat_einsum(eq, x, w, preferred_element_type=jnp.float32)
  return _einsum_f32_out(eq, x, w)
