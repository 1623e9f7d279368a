"""The train step's loss normalisation and gradient accumulation, against independent references."""

import jax
import ml_collections
import numpy as np
import optax

from llm_jax import sharding
from llm_jax.train.measure import synthetic_batch
from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder
from llm_jax.train import optimizer as opt_lib, state as state_lib, step as step_lib
from tests.numerics import assert_close

CFG = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  mlp_dim=64, tie_embeddings=False)
MESH_CFG = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
RULES = (("act_batch", ("data", "fsdp")),)


def _batch(seed=0):
  b = synthetic_batch(8, 16, CFG.vocab_size, docs_per_row=3, seed=seed)
  # Uneven trained-token counts per row: a mean of per-microbatch means would differ from the
  # global token-weighted mean, so this catches the wrong normalisation.
  w = np.zeros_like(b["loss_weights"])
  for r in range(8):
    w[r, : 2 + 2 * r] = 1.0
  b["loss_weights"] = w
  return b


def _step(grad_accum, z_loss=0.0):
  mesh = sharding.make_mesh(MESH_CFG, jax.devices()[:1])
  sgd = optax.sgd(1.0)  # new params = params - grads: the update *is* the gradient
  _, sh = state_lib.state_shardings(CFG, sgd, mesh, RULES)
  state = state_lib.create_state(CFG, sgd, jax.random.key(0), sh, mesh, RULES)
  step = step_lib.jit_train_step(
      step_lib.make_train_step(CFG, sgd, optax.constant_schedule(1.0), grad_accum=grad_accum,
                               z_loss=z_loss),
      sh, mesh, RULES)
  params0 = jax.device_get(state["params"])
  new_state, metrics = step(state, sharding.to_global(_batch(), mesh, RULES))
  grads = jax.tree.map(lambda a, b: a - b, params0, jax.device_get(new_state["params"]))
  return params0, grads, jax.device_get(metrics)


def _reference_loss(params, batch, z_loss=0.0):
  """Weighted mean CE (+ z_loss * log Z^2) in float64 numpy from the model's logits."""
  logits = np.asarray(Decoder(CFG).apply({"params": params}, batch["inputs"], batch["positions"],
                                         batch["segment_ids"]), np.float64)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  ce = log_z - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
  w = batch["loss_weights"]
  return ((ce + z_loss * log_z ** 2) * w).sum() / w.sum()


def test_loss_is_global_token_weighted_mean():
  params0, _, metrics = _step(1)
  np.testing.assert_allclose(metrics["loss"], _reference_loss(params0, _batch()), rtol=1e-5)
  assert metrics["trained_tokens"] == _batch()["loss_weights"].sum()


def test_z_loss_adds_weighted_log_z_squared():
  params0, grads, metrics = _step(1, z_loss=1e-2)
  total = _reference_loss(params0, _batch(), z_loss=1e-2)
  ce = _reference_loss(params0, _batch())
  np.testing.assert_allclose(metrics["loss"], ce, rtol=1e-5)  # the reported loss stays plain CE
  np.testing.assert_allclose(metrics["z_loss"], total - ce, rtol=1e-4)
  _, grads_plain, _ = _step(1)
  assert not np.allclose(grads["final_norm"]["scale"], grads_plain["final_norm"]["scale"])


def test_grad_accumulation_equals_full_batch():
  _, g_full, m_full = _step(1)
  _, g_acc, m_acc = _step(4)  # 4 microbatches of 2 rows
  np.testing.assert_allclose(m_acc["loss"], m_full["loss"], rtol=1e-6)
  np.testing.assert_allclose(m_acc["grad_norm"], m_full["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_acc), jax.tree.leaves(g_full)):
    assert_close(a, b, rel=1e-4)


def test_gradients_match_finite_differences_of_reference_loss():
  params0, grads, _ = _step(1)
  g = grads["final_norm"]["scale"]
  eps = 1e-2  # float32 forward: a larger step keeps round-off well below the slope
  for i in (0, 7, 31):
    fd = []
    for sign in (1, -1):
      p = jax.tree.map(np.array, params0)
      p["final_norm"]["scale"][i] += sign * eps
      fd.append(_reference_loss(p, _batch()))
    np.testing.assert_allclose(g[i], (fd[0] - fd[1]) / (2 * eps), rtol=3e-2, atol=1e-3)


def test_weight_decay_mask_skips_norms_biases_embeddings():
  params = {"embed": {"embedding": 1}, "layers": {"attn": {"q_proj": {"kernel": 1, "bias": 1}},
            "attn_norm": {"scale": 1}}, "lm_head": {"kernel": 1}}
  mask = opt_lib.decay_mask(params)
  assert mask == {"embed": {"embedding": False}, "layers": {"attn": {"q_proj": {
      "kernel": True, "bias": False}}, "attn_norm": {"scale": False}}, "lm_head": {"kernel": True}}
  assert opt_lib.decay_mask(params, True)["embed"]["embedding"] is True


def test_schedules_warm_up_then_decay_to_floor():
  tc = ml_collections.ConfigDict(dict(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1,
                                      schedule="cosine"))
  s = opt_lib.make_schedule(tc)
  assert float(s(0)) == 0.0 and abs(float(s(10)) - 1.0) < 1e-6
  assert abs(float(s(100)) - 0.1) < 1e-6 and float(s(55)) < 1.0
  tc.schedule = "linear"
  assert abs(float(opt_lib.make_schedule(tc)(55)) - 0.55) < 1e-6
  tc.schedule = "constant"
  assert float(opt_lib.make_schedule(tc)(90)) == 1.0
