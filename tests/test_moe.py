"""Mixture-of-experts layers against independent references: the dense MLP, hand-built routing, a
naive per-token loop over experts (forward and gradients), a float64 numpy decoder and numpy
load-balancing / z losses; FLOP accounting. KV-cache generation and transformers parity are in
test_convert_import.py, expert parallelism in test_moe_sharded.py."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models
from llm_jax.model import flops, gmm, moe
from llm_jax.model.config import ModelConfig, MoEConfig
from llm_jax.model.decoder import Decoder
from llm_jax.train import objectives
from tests.model_reference import random_params, reference_logits
from tests.numerics import assert_close, assert_trees_close

jax.config.update("jax_default_matmul_precision", "highest")

# Model-level tests use ragged_dot (cheap to compile); the tiled CPU kernel has its own tests here
# and runs in the sharded test (gmm="auto").
MOE = MoEConfig(n_experts=4, top_k=2, expert_mlp_dim=24, n_shared_experts=1, shared_mlp_dim=16,
                shared_expert_gate=True, aux_loss_coef=0.01, z_loss_coef=0.001, gmm="ragged_dot")
BASE = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=40,
                   rope_theta=1000.0, scan_layers=False, init_std=0.2, moe=MOE, tie_embeddings=False)


def _init(cfg, seed=0):
  """Random everything; norm scales around 1 (as in test_model.py)."""
  params = random_params(cfg, seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * 1.5 + 1 if "scale" in jax.tree_util.keystr(path) else x, params)


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, ids, pos, seg):
  return Decoder(cfg).apply({"params": params}, ids, pos, seg)


@functools.partial(jax.jit, static_argnames=("cfg", "dropless"))
def _sparse_mlp(x, valid, router, gate, up, down, cfg, dropless=False):
  return moe.sparse_mlp(x, valid, router, gate, up, down, cfg, dropless)


def _experts(rng, e, d, f, scale=0.3):
  return tuple(jnp.asarray(scale * rng.standard_normal(s), jnp.float32)
               for s in ((e, d, f), (e, d, f), (e, f, d)))


def test_one_expert_top1_equals_the_dense_mlp():
  dense = dataclasses.replace(BASE, n_layers=1, moe=MoEConfig())
  params = _init(dense)
  ids = np.array([[3, 17, 5, 60, 2, 9, 33]], np.int32)
  pos, seg = np.arange(7)[None], np.ones((1, 7), np.int32)
  want = _forward(dense, params, ids, pos, seg)
  for capacity_factor in (0.0, 1.0):  # dropless, and a capacity that holds every token
    cfg = dataclasses.replace(dense, moe=MoEConfig(n_experts=1, top_k=1, capacity_factor=capacity_factor,
                                                   gmm="ragged_dot"))
    sparse = {k: v for k, v in params.items()}
    for i in range(cfg.n_layers):
      layer = dict(params[f"layers_{i}"])
      mlp = layer.pop("mlp")
      layer["moe"] = {"router": jnp.full((cfg.dim, 1), 0.3),
                      **{k: mlp[k]["kernel"][None] for k in ("gate_proj", "up_proj", "down_proj")}}
      sparse[f"layers_{i}"] = layer
    assert_close(np.asarray(_forward(cfg, sparse, ids, pos, seg)), np.asarray(want), rel=1e-6)


def test_hand_built_routing_sends_each_token_to_the_expected_experts():
  # Router = 3 * identity: token t's logits are 3 * x_t, so its experts are the two largest entries.
  x_TxD = jnp.asarray([[2.0, 1.0, 0.0, -1.0],    # experts 0, 1
                       [0.0, -1.0, 3.0, 2.0],    # 2, 3
                       [1.0, 0.0, 0.0, 4.0],     # 3, 0
                       [0.0, 5.0, 4.5, 0.0],     # 1, 2
                       [9.0, 9.5, 9.0, 9.0]])    # padding: routed nowhere
  valid = np.array([True, True, True, True, False])
  expected = [(0, 1), (2, 3), (3, 0), (1, 2)]
  cfg = dataclasses.replace(BASE, dim=4, moe=MoEConfig(n_experts=4, top_k=2, norm_topk_prob=False,
                                                       gmm="ragged_dot"))
  router = 3.0 * jnp.eye(4)
  _, probs, weights, experts = moe.route(x_TxD, router, 2, norm_topk_prob=False)
  assert [tuple(int(e) for e in row) for row in experts[:4]] == expected
  p = np.exp(3 * np.asarray(x_TxD)) / np.exp(3 * np.asarray(x_TxD)).sum(-1, keepdims=True)
  assert_close(weights[:4], [p[t, list(e)] for t, e in enumerate(expected)], rel=1e-6)

  gate, up, down = _experts(np.random.default_rng(0), 4, 4, 6)
  y, stats = _sparse_mlp(x_TxD[None], jnp.asarray(valid)[None], router, gate, up, down, cfg)
  silu = lambda v: v / (1 + np.exp(-v))
  xn, g, u, dn = (np.asarray(a, np.float64) for a in (x_TxD, gate, up, down))
  for t, chosen in enumerate(expected):
    want = sum(p[t, e] * (silu(xn[t] @ g[e]) * (xn[t] @ u[e])) @ dn[e] for e in chosen)
    assert_close(y[0, t], want, rel=1e-5)
  np.testing.assert_array_equal(y[0, 4], 0)  # the padding token reached no expert
  np.testing.assert_array_equal(stats["moe_load_E"], [2, 2, 2, 2])
  assert float(stats["moe_slots"]) == 8 and float(stats["moe_dropped"]) == 0


def _choices(x_TxD, router, top_k):
  probs = np.asarray(jax.nn.softmax(x_TxD @ router, axis=-1))
  return np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]


def _naive_moe(x_TxD, valid_T, router, gate, up, down, chosen_TxK, norm):
  """Token by token, choice by choice: each token multiplies the weights of its own chosen experts,
  gathered per (token, choice): the definition, with no sorting or grouping. The choices
  (piecewise constant in the inputs) are given, so the function is differentiable as it stands."""
  probs = jax.nn.softmax(x_TxD @ router, axis=-1)
  w_TxK = jnp.take_along_axis(probs, jnp.asarray(chosen_TxK), axis=-1)
  if norm:
    w_TxK = w_TxK / jnp.sum(w_TxK, axis=-1, keepdims=True)
  g = jnp.einsum("td,tkdf->tkf", x_TxD, gate[chosen_TxK])
  u = jnp.einsum("td,tkdf->tkf", x_TxD, up[chosen_TxK])
  y_TxKxD = jnp.einsum("tkf,tkfd->tkd", jax.nn.silu(g) * u, down[chosen_TxK])
  return jnp.einsum("tkd,tk->td", y_TxKxD, w_TxK) * valid_T


def test_tiled_grouped_matmul_equals_a_loop_over_groups_with_gradients():
  """The CPU kernel: groups of 0 rows, groups sharing a tile, rows past the last group."""
  rng = np.random.default_rng(0)
  sizes = [5, 0, 11, 1, 0, 6]  # 23 of 29 rows in groups; tile 8: groups share tiles
  x = jnp.asarray(rng.standard_normal((29, 6)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((6, 6, 7)), jnp.float32)
  r = jnp.asarray(rng.standard_normal((29, 7)), jnp.float32)
  gs = jnp.asarray(sizes, jnp.int32)
  group = np.repeat(np.arange(6), sizes)

  def loop(x, w):  # row by row
    rows = [x[i] @ w[group[i]] for i in range(len(group))]
    return jnp.concatenate([jnp.stack(rows), jnp.zeros((29 - len(group), 7))])

  tiled = jax.jit(lambda x, w: gmm.grouped_matmul(x, w, gs, impl="tiled", tile=8))
  assert_close(tiled(x, w), loop(x, w), rel=1e-6)
  g_tiled = jax.jit(jax.grad(lambda x, w: jnp.sum(tiled(x, w) * r), argnums=(0, 1)))(x, w)
  g_loop = jax.jit(jax.grad(lambda x, w: jnp.sum(loop(x, w) * r), argnums=(0, 1)))(x, w)
  assert_trees_close(g_tiled, g_loop, rel=1e-6)


def test_dropless_equals_a_naive_loop_forward_and_gradients():
  rng = np.random.default_rng(1)
  e, d, f, b, l = 5, 12, 10, 2, 7
  cfg = dataclasses.replace(BASE, dim=d, moe=MoEConfig(n_experts=e, top_k=2, gmm="ragged_dot"))
  x = jnp.asarray(rng.standard_normal((b, l, d)), jnp.float32)
  valid = jnp.asarray(np.arange(l)[None] < np.array([[7], [4]]))  # row 1 ends in padding
  router = jnp.asarray(rng.standard_normal((d, e)), jnp.float32)
  weights = (router,) + _experts(rng, e, d, f)
  r = jnp.asarray(rng.standard_normal((b, l, d)), jnp.float32)  # a random cotangent

  chosen = _choices(x.reshape(b * l, d), router, 2)

  @jax.jit
  def ours(*args):  # output and the gradients for cotangent r, one compile
    y, vjp = jax.vjp(lambda *a: moe.sparse_mlp(a[0], valid, *a[1:], cfg)[0], *args)
    return y, vjp(r)

  def naive(*args):
    f = lambda x, *w: _naive_moe(x.reshape(b * l, d), valid.reshape(-1)[:, None], *w, chosen,
                                 True).reshape(b, l, d)
    y, vjp = jax.vjp(f, *args)
    return y, vjp(r)

  y_ours, g_ours = ours(x, *weights)
  y_naive, g_naive = naive(x, *weights)
  assert_close(y_ours, y_naive, rel=1e-5)
  assert_trees_close(g_ours, g_naive, rel=1e-5)
  assert float(jnp.abs(g_naive[1]).max()) > 1e-3  # the router gets a real gradient


def test_capacity_keeps_first_choices_then_token_order_and_counts_drops():
  # Every token's first choice is expert 0, its second expert 1 (router favours 0 > 1 > others).
  t, d, e = 6, 4, 4
  x = jnp.ones((1, t, d)) + 0.01 * jnp.arange(t * d, dtype=jnp.float32).reshape(1, t, d)
  router = jnp.zeros((d, e)).at[:, 0].set(2.0).at[:, 1].set(1.0)
  gate, up, down = _experts(np.random.default_rng(2), e, d, 5)
  valid = jnp.ones((1, t), bool)
  cfg = dataclasses.replace(BASE, dim=d, moe=MoEConfig(n_experts=e, top_k=2, capacity_factor=1.0))
  cap = moe.capacity(t, 2, e, 1.0)
  assert cap == 3
  y, stats = _sparse_mlp(x, valid, router, gate, up, down, cfg)
  # Experts 0 and 1 each take the first 3 tokens; tokens 3..5 lose both choices.
  assert float(stats["moe_dropped"]) == 6 and float(stats["moe_slots"]) == 12
  _, _, w, _ = moe.route(x[0], router, 2, True)
  xn = np.asarray(x[0], np.float64)
  silu = lambda v: v / (1 + np.exp(-v))
  expert = lambda k, v: (silu(v @ np.asarray(gate[k])) * (v @ np.asarray(up[k]))) @ np.asarray(down[k])
  for i in range(t):
    want = (w[i, 0] * expert(0, xn[i]) + w[i, 1] * expert(1, xn[i])) if i < cap else np.zeros(d)
    assert_close(y[0, i], want, rel=1e-5)
  # Generation routes dropless whatever the capacity.
  y_free, stats = _sparse_mlp(x, valid, router, gate, up, down, cfg, dropless=True)
  assert float(stats["moe_dropped"]) == 0 and float(jnp.abs(y_free[0, 5]).max()) > 0


def _batch(cfg, rng):
  """Row 0: two packed documents; row 1: one document then padding. Uneven loss weights."""
  docs = [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in (4, 5, 6)]
  ids = np.zeros((2, 9), np.int32)
  seg, pos = np.zeros_like(ids), np.zeros_like(ids)
  ids[0] = np.concatenate(docs[:2])
  seg[0], pos[0] = [1] * 4 + [2] * 5, list(range(4)) + list(range(5))
  ids[1, :6], seg[1, :6], pos[1, :6] = docs[2], 1, range(6)
  weights = np.zeros((2, 9), np.float32)
  weights[0, :7], weights[1, :3] = 1.0, 0.5
  return {"inputs": ids, "targets": np.roll(ids, -1, 1), "loss_weights": weights,
          "segment_ids": seg, "positions": pos}, docs


def test_decoder_and_router_losses_equal_the_numpy_reference():
  cfg = dataclasses.replace(BASE, scan_layers=True)
  params = _init(cfg)
  unrolled = {**{k: v for k, v in params.items() if k != "layers"},
              **{f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(2)}}
  batch, docs = _batch(cfg, np.random.default_rng(3))
  logits = _forward(cfg, params, batch["inputs"], batch["positions"], batch["segment_ids"])
  router = []  # per document: [sparse layer][L, E]
  for r, c, doc in ((0, 0, docs[0]), (0, 4, docs[1]), (1, 0, docs[2])):
    per_layer = []
    want = reference_logits(unrolled, cfg, doc, router_logits=per_layer)
    assert_close(np.asarray(logits[r, c:c + len(doc)]), want, rel=1e-5)
    router.append(per_layer)

  # numpy: per row and sparse layer, E * sum_e f_e P_e over the row's real tokens; mean logZ^2.
  e, k = cfg.moe.n_experts, cfg.moe.top_k
  aux, z = np.zeros(2), np.zeros(2)
  for layer in range(cfg.n_sparse_layers):
    for row, lg in ((0, np.concatenate([router[0][layer], router[1][layer]])), (1, router[2][layer])):
      probs = np.exp(lg - lg.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      top = np.argsort(-probs, axis=-1)[:, :k]
      f = np.bincount(top.ravel(), minlength=e) / top.size
      aux[row] += e * np.sum(f * probs.mean(0))
      z[row] += np.mean(np.log(np.exp(lg).sum(-1)) ** 2)
  w_row = batch["loss_weights"].sum(-1)
  want_moe_loss = cfg.moe.aux_loss_coef * (w_row * aux).sum() + cfg.moe.z_loss_coef * (w_row * z).sum()

  objective = objectives.language_model(cfg)
  sums = jax.jit(lambda p, b: objective.sums(p, {}, b, jax.random.key(0)))(params, batch)
  assert_close(sums["moe_loss"], want_moe_loss, rel=1e-5)
  assert_close(sums["loss"], sums["ce"] + want_moe_loss, rel=1e-6)
  metrics = objective.metrics(sums)
  n_sparse = cfg.n_sparse_layers
  assert_close(metrics["moe_aux_loss"], (w_row * aux).sum() / w_row.sum() / n_sparse, rel=1e-5)
  assert_close(metrics["moe_z_loss"], (w_row * z).sum() / w_row.sum() / n_sparse, rel=1e-5)
  # 15 real tokens x 2 choices per layer, padding excluded.
  total = sum(float(metrics[f"moe_tokens_per_expert/{j}"]) for j in range(e))
  assert total == 15 * k


def test_flops_count_active_experts():
  cfg = ModelConfig.from_config(models.get("minimind-moe"), vocab_size=6400)
  d, f, e, k = 512, 1408, 4, 2
  attn = d * 64 * (2 * 8 + 2 * 2)
  per_layer = attn + d * e + k * 3 * d * f + 3 * d * f  # router, 2 of 4 experts, 1 shared expert
  assert flops.matmul_params(cfg) == 8 * per_layer + d * 6400
  shapes = jax.eval_shape(lambda: random_params(dataclasses.replace(cfg, n_layers=1), 0))
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  one_layer = dataclasses.replace(cfg, n_layers=1)
  assert flops.active_param_count(one_layer, shapes) == total - (e - k) * 3 * d * f


@pytest.mark.parametrize("field,value,match", [
    ("top_k", 5, "moe.top_k"), ("every", 3, "moe.every"), ("gmm", "cuda", "moe.gmm"),
    ("shared_expert_gate", True, "moe.shared_expert_gate"), ("capacity_factor", -1.0, "moe.capacity_factor"),
])
def test_bad_moe_config_names_the_field(field, value, match):
  m = dataclasses.replace(MOE, **{"n_shared_experts": 0, "shared_expert_gate": False, field: value})
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(BASE, scan_layers=True, moe=m).validate()


def test_init_from_adopts_the_source_runs_experts_and_rope_scaling(tmp_path):
  from configs import base  # pylint: disable=g-import-not-at-top
  from llm_jax import rundir  # pylint: disable=g-import-not-at-top
  from llm_jax.train import run_setup
  src = base.get_config("minimind-moe")
  src.model.moe.expert_mlp_dim = 256
  src.model.rope_scaling.update(type="llama3", factor=32.0, original_max_position_embeddings=8192)
  rundir.write_config(str(tmp_path), src)
  job = base.get_config("minimind-26m")
  job.model.moe.capacity_factor = 1.5  # a routing choice: stays the job's
  run_setup.adopt_source_model(job, str(tmp_path))
  assert (job.model.moe.n_experts, job.model.moe.expert_mlp_dim, job.model.moe.n_shared_experts) == (4, 256, 1)
  assert job.model.rope_scaling.type == "llama3" and job.model.rope_scaling.factor == 32.0
  assert job.model.moe.capacity_factor == 1.5
  # A run written before config.model.moe existed was dense.
  old = base.get_config("minimind-26m")
  del old.model["moe"]
  rundir.write_config(str(tmp_path), old)
  run_setup.adopt_source_model(job, str(tmp_path))
  assert job.model.moe.n_experts == 0
