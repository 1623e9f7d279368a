"""Fused attention kernels (splash for TPU, Pallas/Triton for GPU) in Pallas interpret mode equal
the XLA attention on packed, GQA batches: outputs and gradients, alone and inside the model.

Interpret mode runs each kernel's tile program as plain XLA on the CPU, so shapes stay minimal:
two rows, several documents per row with boundaries inside and across tiles, padding, and
just enough length for 2 x 2 tiles (splash tiles are multiples of 128 lanes).
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.model import kernels
from llm_jax.model.attention import segment_causal_mask, xla_attention
from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder
from llm_jax.model.kernels import dispatch
from tests.model_reference import random_params
from tests.numerics import assert_close

jax.config.update("jax_default_matmul_precision", "highest")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiles per kernel: 2 x 2 forward tiles, and more in the backward pass for pallas_gpu.
CASES = {"splash": dict(length=256, tiles=(128, 128, 128, 128)),
         "pallas_gpu": dict(length=64, tiles=(32, 32, 16, 16))}


def packed_segment_ids(length: int) -> np.ndarray:
  """Row 0: three documents and trailing padding; row 1: a 5-token document, one that crosses
  the middle tile boundary, and one to the end."""
  seg = np.zeros((2, length), np.int32)
  seg[0, :length // 3] = 1
  seg[0, length // 3:length - length // 4] = 2
  seg[0, length - length // 4:length - 5] = 3
  seg[1, :5] = 1
  seg[1, 5:length // 2 + 7] = 2
  seg[1, length // 2 + 7:] = 3
  return seg


def _qkv(length, head_dim, n_heads=4, n_kv=2, seed=0):
  rng = np.random.default_rng(seed)
  shapes = [(2, length, n_heads, head_dim), (2, length, n_kv, head_dim), (2, length, n_kv, head_dim),
            (2, length, n_heads, head_dim)]
  return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]


def _value_and_grads(attend, q, k, v, ct):
  """(output, d/d(q, k, v) of sum(output * ct)) in one jitted pass."""
  def f(q, k, v):
    out = attend(q, k, v)
    return jnp.sum(out * ct), out
  (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


@pytest.mark.parametrize("impl", ["splash", "pallas_gpu"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernel_equals_xla_attention_with_gradients(impl, head_dim):
  length, tiles = CASES[impl]["length"], CASES[impl]["tiles"]
  seg = jnp.asarray(packed_segment_ids(length))
  q, k, v, ct = _qkv(length, head_dim)
  if impl == "splash":
    from llm_jax.model.kernels import splash as module
  else:
    from llm_jax.model.kernels import pallas_gpu as module
  got, got_grads = _value_and_grads(
      lambda q, k, v: module.attention(q, k, v, seg, tiles, interpret=True), q, k, v, ct)
  want, want_grads = _value_and_grads(
      lambda q, k, v: xla_attention(q, k, v, segment_causal_mask(seg), jnp.float32), q, k, v, ct)
  assert_close(got, want, rel=1e-5, err_msg="output")
  for name, g, w in zip("qkv", got_grads, want_grads):
    assert_close(g, w, rel=1e-5, err_msg=f"d{name}")


BASE = ModelConfig(vocab_size=56, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                   mlp_dim=96, init_std=0.2, scan_layers=True, tie_embeddings=False)


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, ids, pos, seg):
  return Decoder(cfg).apply({"params": params}, ids, pos, seg)


def test_model_forward_auto_is_the_xla_path_on_cpu():
  length = CASES["pallas_gpu"]["length"]
  seg = packed_segment_ids(length)
  pos = np.tile(np.arange(length, dtype=np.int32), (2, 1))
  ids = np.random.default_rng(1).integers(0, BASE.vocab_size, seg.shape).astype(np.int32)
  xla_cfg = dataclasses.replace(BASE, attention="xla")
  cfg = dataclasses.replace(BASE, attention="auto").validate()
  assert kernels.fused_impl(cfg, length) is None
  params = random_params(xla_cfg, 0)
  program = lambda c: str(jax.make_jaxpr(lambda p: Decoder(c).apply({"params": p}, ids, pos, seg))(params))
  assert program(cfg) == program(xla_cfg)  # the very same computation


def test_sharded_model_forward_and_gradients_equal_xla():
  """8 virtual devices: the model forward with attention=splash / pallas_gpu (under shard_map
  on a 2x2x2 mesh) equals the one-device XLA forward; pallas_gpu's gradients too on a 1x2x4
  mesh, where the 2 kv heads do not split 4 ways (see kernels_sharded_check.py)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=ROOT,
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "kernels_sharded_check.py")],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  for impl in ("splash", "pallas_gpu"):
    assert res[f"{impl}_shard_map"], res  # really the sharded path
    assert res[f"{impl}_model_2x2x2"] <= 1e-5, res
  assert all(e <= 1e-5 for e in res["pallas_gpu_grads_1x2x4"].values()), res


def test_tiles_fit_the_sequence():
  cfg = dataclasses.replace(BASE, attention="splash")
  assert dispatch.blocks(cfg, "splash", 4096)[0] == (512, 512, 512, 512)
  assert dispatch.blocks(cfg, "splash", 640)[0] == (128, 128, 128, 128)  # 512 does not divide 640
  assert dispatch.blocks(cfg, "splash", 256)[0] == (256, 256, 256, 256)
  assert "multiple of 128" in dispatch.blocks(cfg, "splash", 200)[1]
  gpu = dataclasses.replace(BASE, attention="pallas_gpu", attention_block_q=64)
  assert dispatch.blocks(gpu, "pallas_gpu", 96)[0] == (32, 32, 32, 32)  # powers of two only
  assert dispatch.blocks(gpu, "pallas_gpu", 2048)[0] == (64, 128, 32, 32)


def test_kernel_choice_and_errors_name_the_field():
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU fallbacks")
  assert kernels.fused_impl(dataclasses.replace(BASE, attention="auto"), 4096) is None
  with pytest.raises(ValueError, match=r"config.model.attention='splash' needs a TPU.*backend is 'cpu'"):
    kernels.fused_impl(dataclasses.replace(BASE, attention="splash"), 256)
  with pytest.raises(ValueError, match=r"config.model.attention='pallas_gpu'.*length 72"):
    kernels.fused_impl(dataclasses.replace(BASE, attention="pallas_gpu", attention_interpret=True), 72)
  with pytest.raises(ValueError, match="config.model.attention_block_q=96.*multiples of 128"):
    dataclasses.replace(BASE, attention="splash", attention_block_q=96).validate()
  with pytest.raises(ValueError, match="config.model.attention_block_kv_bwd=48.*powers of two"):
    dataclasses.replace(BASE, attention="pallas_gpu", attention_block_kv_bwd=48).validate()
  with pytest.raises(ValueError, match="config.model.attention='flash'"):
    dataclasses.replace(BASE, attention="flash").validate()
