"""Decoder correctness on CPU against independent references (numpy, unpacked runs)."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder
from llm_jax.model.flops import flops_per_token, param_counts
from tests.model_reference import random_params, reference_logits
from tests.numerics import assert_close

jax.config.update("jax_default_matmul_precision", "highest")

BASE = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=40,
                   rope_theta=1000.0, scan_layers=False, init_std=0.2, tie_embeddings=False)
QWEN3 = dataclasses.replace(BASE, qk_norm=True, qkv_bias=True, tie_embeddings=True)
MHA24 = dataclasses.replace(BASE, dim=40, n_heads=2, n_kv_heads=2, head_dim=24, qkv_bias=True)


def _init_params(cfg, rng):
  ids = jnp.zeros((1, 1), jnp.int32)
  return nn.unbox(Decoder(cfg).init(rng, ids, ids, jnp.ones_like(ids))["params"])


def _init(cfg, seed=0):
  # Random everything, norm scales and biases included (not ones/zeros), so a mistake in their use
  # cannot hide. Scales around 1: N(1, 0.3).
  params = random_params(cfg, seed)
  def shift(path, x):
    return x * 1.5 + 1 if "scale" in jax.tree_util.keystr(path) else x
  return jax.tree_util.tree_map_with_path(shift, params)


def _stack(params, n_layers):
  """layers_i trees -> one "layers" tree with a leading axis (the scan layout)."""
  layers = [params[f"layers_{i}"] for i in range(n_layers)]
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  out["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
  return out


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, ids, pos, seg):
  return Decoder(cfg).apply({"params": params}, ids, pos, seg)


@pytest.mark.parametrize("cfg", [BASE, QWEN3, MHA24], ids=["llama", "qwen3", "mha_hd24"])
def test_matches_numpy_reference(cfg):
  params = _init(cfg)
  ids = np.array([3, 17, 5, 60, 2, 9, 33], np.int32)
  got = _forward(cfg, params, ids[None], np.arange(7)[None], np.ones((1, 7), np.int32))[0]
  want = reference_logits(params, cfg, ids)
  assert_close(np.asarray(got), want, rel=1e-5)


def test_rope_positions_come_from_the_batch():
  # RoPE is relative, so a shift changes nothing; uneven gaps between positions must change the logits.
  params = _init(BASE)
  ids = np.array([[3, 17, 5]], np.int32)
  positions = np.array([0, 5, 6])
  got = _forward(BASE, params, ids, positions[None], np.ones_like(ids))[0]
  want = reference_logits(params, BASE, ids[0], positions)
  assert_close(np.asarray(got), want, rel=1e-5)
  assert np.abs(want - reference_logits(params, BASE, ids[0])).max() > 1e-3


@pytest.mark.parametrize("cfg,scan", [(BASE, False), (BASE, True), (QWEN3, False), (QWEN3, True)],
                         ids=["llama-unrolled", "llama-scan", "qwen3-unrolled", "qwen3-scan"])
def test_packed_equals_alone(cfg, scan):
  rng = np.random.default_rng(0)
  lengths = [5, 3, 7]
  docs = [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in lengths]
  pad = 3
  ids = np.concatenate(docs + [np.zeros(pad, np.int32)])[None]
  pos = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(pad, int)])[None]
  seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(pad, int)])[None]
  params = _init(cfg)
  run_cfg = dataclasses.replace(cfg, scan_layers=scan)
  run_params = _stack(params, cfg.n_layers) if scan else params
  packed = np.asarray(_forward(run_cfg, run_params, ids, pos, seg))[0]
  assert np.isfinite(packed).all()  # padding rows included
  # Each document alone in its own row (right padding after it cannot reach it: causal mask).
  n = max(lengths)
  alone_ids = np.stack([np.pad(d, (0, n - len(d))) for d in docs])
  alone_pos = np.tile(np.arange(n), (len(docs), 1))
  alone_seg = (alone_pos < np.array(lengths)[:, None]).astype(np.int32)
  alone = np.asarray(_forward(run_cfg, run_params, alone_ids, alone_pos, alone_seg))
  start = 0
  for i, doc in enumerate(docs):
    assert_close(packed[start:start + len(doc)], alone[i, :len(doc)], rel=1e-5)
    start += len(doc)


def test_scan_equals_unrolled():
  params = _init(QWEN3)
  ids = np.array([[4, 8, 15, 16, 23, 42]], np.int32)
  pos, seg = np.arange(6)[None], np.ones_like(ids)
  unrolled = _forward(QWEN3, params, ids, pos, seg)
  scanned = _forward(dataclasses.replace(QWEN3, scan_layers=True), _stack(params, QWEN3.n_layers), ids, pos, seg)
  assert_close(np.asarray(scanned), np.asarray(unrolled), rel=1e-6)


@pytest.mark.parametrize("scan,policies", [
    (True, ("full", "dots", "dots_with_no_batch_dims", "save_attn_out")),
    (False, ("save_attn_out",)),  # the unrolled path wraps layers the same way; one suffices
], ids=["scan", "unrolled"])
def test_remat_policies_give_identical_gradients(scan, policies):
  cfg = dataclasses.replace(BASE, scan_layers=scan)
  params = _init(BASE)
  params = _stack(params, cfg.n_layers) if scan else params
  ids = jnp.array([[4, 8, 15, 16, 23, 42, 7, 1]], jnp.int32)
  pos, seg = jnp.arange(8)[None], jnp.ones_like(ids)

  def grads(policy):
    c = dataclasses.replace(cfg, remat_policy=policy)
    def loss(p):
      logits = Decoder(c).apply({"params": p}, ids, pos, seg)
      return -jnp.mean(jax.nn.log_softmax(logits)[0, jnp.arange(7), ids[0, 1:]])
    return jax.jit(jax.grad(loss))(params)

  want = grads("none")
  for policy in policies:
    got = grads(policy)
    jax.tree_util.tree_map(lambda a, b: assert_close(a, b, rel=1e-6), got, want)


def test_bfloat16_compute_stays_close_and_params_keep_their_dtype():
  cfg = dataclasses.replace(BASE, dtype="bfloat16", param_dtype="float32")
  shapes = jax.eval_shape(functools.partial(_init_params, cfg), jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(shapes))
  params = _init(cfg)
  tokens = np.array([3, 17, 5, 60, 2], np.int32)
  logits = _forward(cfg, params, tokens[None], np.arange(5)[None], np.ones((1, 5), np.int32))
  assert logits.dtype == jnp.float32
  want = reference_logits(params, cfg, tokens)
  assert np.abs(np.asarray(logits[0]) - want).max() < 0.05 * np.abs(want).max()


def test_param_counts_and_flops_by_hand():
  cfg = dataclasses.replace(BASE, tie_embeddings=False)
  params = jax.eval_shape(functools.partial(_init_params, cfg), jax.random.key(0))  # shapes only
  d, h, n, k, f, v = 32, 8, 4, 2, 40, 61
  per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f + 2 * d
  counts = param_counts(params)
  assert counts == {"total": v * d + 2 * per_layer + d + d * v, "embedding": v * d, "lm_head": d * v,
                    "non_embedding": 2 * per_layer + d}
  n_matmul = 2 * (d * n * h + 2 * d * k * h + n * h * d + 3 * d * f) + d * v
  assert flops_per_token(cfg, 128) == 6 * n_matmul + 12 * 2 * n * h * 128


def test_cudnn_on_cpu_fails_clearly():
  if jax.default_backend() == "gpu":
    pytest.skip("has a GPU")
  cfg = dataclasses.replace(BASE, attention="cudnn", dtype="bfloat16").validate()
  with pytest.raises(ValueError, match="config.model.dtype"):
    dataclasses.replace(BASE, attention="cudnn").validate()
  with pytest.raises(ValueError, match="config.model.attention"):
    jax.eval_shape(functools.partial(_init_params, cfg), jax.random.key(0))
