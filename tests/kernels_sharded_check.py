"""Run by tests/test_kernels.py in a subprocess with 8 virtual CPU devices: the fused kernels
(Pallas interpret mode) under shard_map on a data x fsdp x tensor mesh equal the XLA attention on
one device, inside the model forward and with gradients. Prints JSON of relative errors."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from llm_jax import sharding
from llm_jax.model import kernels
from llm_jax.model.attention import segment_causal_mask, xla_attention
from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder
from llm_jax.model import init as model_init
from tests.model_reference import random_params
from tests.test_kernels import CASES, packed_segment_ids

jax.config.update("jax_default_matmul_precision", "highest")
RULES = base.SHARDING_RULES
CFG = ModelConfig(vocab_size=56, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                  mlp_dim=96, init_std=0.2, scan_layers=True, attention_interpret=True, tie_embeddings=False)


def rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def rows(length, n_rows=4):
  seg = np.concatenate([packed_segment_ids(length)] * (n_rows // 2))
  pos = np.zeros_like(seg)
  for r in range(n_rows):
    for s in np.unique(seg[r]):
      idx = np.where(seg[r] == s)[0]
      pos[r, idx] = np.arange(len(idx))
  ids = np.random.default_rng(1).integers(0, CFG.vocab_size, seg.shape).astype(np.int32)
  return ids, pos, seg


def model_forward(impl: str, mesh_shape) -> tuple[float, bool]:
  """The sharded model forward with `impl` vs the one-device XLA forward; and whether the traced
  program really holds a shard_map."""
  length = CASES[impl]["length"]
  ids, pos, seg = rows(length)
  xla_cfg = dataclasses.replace(CFG, attention="xla")
  params = random_params(xla_cfg, 0)
  want = jax.jit(lambda p: Decoder(xla_cfg).apply({"params": p}, ids, pos, seg))(params)

  cfg = dataclasses.replace(CFG, attention=impl)
  mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
  _, shardings = model_init.abstract(cfg, mesh, RULES)
  with sharding.mesh_context(mesh, RULES):
    params = jax.device_put(params, shardings)
    batch = sharding.to_global({"ids": ids, "pos": pos, "seg": seg}, mesh, RULES)
    fwd = jax.jit(lambda p, b: Decoder(cfg).apply({"params": p}, b["ids"], b["pos"], b["seg"]))
    has_shard_map = "shard_map" in str(jax.make_jaxpr(fwd)(params, batch))
    got = fwd(params, batch)
  return rel_err(got, want), has_shard_map


def attention_grads(impl: str, mesh_shape) -> dict:
  """Kernel output and d/d(q, k, v) under shard_map vs one-device XLA attention."""
  length, head_dim = CASES[impl]["length"], 64
  _, _, seg = rows(length)
  rng = np.random.default_rng(0)
  q, ct = (jnp.asarray(rng.standard_normal((4, length, 4, head_dim)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(rng.standard_normal((4, length, 2, head_dim)), jnp.float32) for _ in range(2))
  cfg = dataclasses.replace(CFG, attention=impl, head_dim=head_dim)

  def loss(attend):
    def f(q, k, v):
      out = attend(q, k, v)
      return jnp.sum(out * ct), out
    return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)

  (_, want), want_g = jax.jit(loss(lambda q, k, v: xla_attention(q, k, v, segment_causal_mask(seg), jnp.float32)))(q, k, v)
  mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
  with sharding.mesh_context(mesh, RULES):
    (_, got), got_g = jax.jit(loss(lambda q, k, v: kernels.attention(q, k, v, jnp.asarray(seg), cfg)))(q, k, v)
  errs = {"out": rel_err(got, want)}
  errs.update({f"d{n}": rel_err(g, w) for n, g, w in zip("qkv", got_g, want_g)})
  return errs


def main():
  assert jax.device_count() == 8
  res = {}
  for impl in ("splash", "pallas_gpu"):
    err, has = model_forward(impl, (2, 2, 2))
    res[f"{impl}_model_2x2x2"] = err
    res[f"{impl}_shard_map"] = has
  # tensor=4 does not divide the 2 kv heads: kv is repeated per query head before the split.
  res["pallas_gpu_grads_1x2x4"] = attention_grads("pallas_gpu", (1, 2, 4))
  print(json.dumps(res))


if __name__ == "__main__":
  main()
