"""Chunked cross-entropy equals the full one (loss, metrics and gradients), in the LM objective and
the eval step too, and the [B, L, V] logits never exist."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder, output_weights
from llm_jax.train import chunked_loss, loss as loss_lib, objectives
from tests.model_reference import random_params
from tests.numerics import assert_close, assert_trees_close
from tests.test_mixed_precision import _eqns

jax.config.update("jax_default_matmul_precision", "highest")

B, L, D, V = 2, 13, 8, 37


def _inputs(layout, seed=0):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((V, D) if layout == "vd" else (D, V)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32)
  weights = jnp.asarray(rng.random((B, L)) * (rng.random((B, L)) > 0.25), jnp.float32)  # some 0
  return hidden, w, targets, weights


@pytest.mark.parametrize("layout,z_loss", [("vd", 1e-2), ("dv", 0.0)],
                         ids=["tied_embedding_zloss", "lm_head"])
def test_chunked_equals_full_loss_metrics_and_gradients(layout, z_loss):
  hidden, w, targets, weights = _inputs(layout)
  eq = f"bld,{layout}->blv"

  def full(h, w, wt):
    sums = loss_lib.cross_entropy_sums(jnp.einsum(eq, h, w), targets, wt, z_loss)
    return sums["loss"] / 7.0, sums

  def chunked(h, w, wt):  # 13 positions in chunks of 5: the last chunk is padded
    sums = chunked_loss.chunked_cross_entropy_sums(h, w, targets, wt, eq=eq, chunk_len=5,
                                                   z_loss=z_loss)
    return sums["loss"] / 7.0, sums

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
  (_, want), want_grads = grad(full)(hidden, w, weights)
  (_, got), got_grads = grad(chunked)(hidden, w, weights)
  assert_trees_close(got, want, rel=1e-6)
  for name, g, x in zip(("hidden", "w", "weights"), got_grads, want_grads):
    assert_close(g, x, rel=1e-5, err_msg=name)


def test_ce_gradient_and_the_z_loss_guard():
  hidden, w, targets, weights = _inputs("vd", seed=1)
  eq = "bld,vd->blv"
  ce = lambda z: jax.jit(jax.grad(lambda h: chunked_loss.chunked_cross_entropy_sums(
      h, w, targets, weights, eq=eq, chunk_len=4, z_loss=z)["ce"]))
  want = jax.jit(jax.grad(lambda h: loss_lib.cross_entropy_sums(jnp.einsum(eq, h, w), targets, weights)["ce"]))
  assert_close(ce(0.0)(hidden), want(hidden), rel=1e-5)
  with pytest.raises(NotImplementedError, match="differentiates 'loss' only"):
    jax.eval_shape(jax.grad(lambda h: chunked_loss.chunked_cross_entropy_sums(
        h, w, targets, weights, eq=eq, chunk_len=4, z_loss=1e-3)["ce"]), hidden)


MODEL = ModelConfig(vocab_size=211, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4,
                    mlp_dim=24, init_std=0.3, scan_layers=True, tie_embeddings=False)


def _batch(length=32, seed=0):
  rng = np.random.default_rng(seed)
  seg = np.ones((2, length), np.int32)
  seg[0, 20:] = 2
  seg[1, 29:] = 0  # padding
  pos = np.where(seg == 2, np.arange(length) - 20, np.arange(length)).astype(np.int32)
  return {"inputs": jnp.asarray(rng.integers(0, MODEL.vocab_size, (2, length)), jnp.int32),
          "targets": jnp.asarray(rng.integers(0, MODEL.vocab_size, (2, length)), jnp.int32),
          "loss_weights": jnp.asarray((seg > 0) * rng.random((2, length)), jnp.float32),
          "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(pos)}


def test_objective_with_chunked_loss_equals_full_logits():
  # Tied: the embedding's gradient sums the lookup's and the chunked output layer's (the
  # untied lm_head layout is covered above, function by function).
  cfg = dataclasses.replace(MODEL, tie_embeddings=True)
  params = random_params(cfg, 0)
  batch = _batch()

  def loss_and_grads(c):
    objective = objectives.language_model(c, z_loss=1e-3)
    f = lambda p: (lambda s: (s["loss"] / objective.normalizer(batch), s))(objective.sums(p, {}, batch, None))
    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

  (_, want), want_grads = loss_and_grads(cfg)
  (_, got), got_grads = loss_and_grads(dataclasses.replace(cfg, loss_chunk_len=7))
  assert_trees_close(got, want, rel=1e-6)
  assert_trees_close(got_grads, want_grads, rel=1e-5)


def test_eval_sums_equal_full_logits_per_document_too():
  params = random_params(MODEL, 1)
  batch = _batch(seed=2)
  model = Decoder(MODEL)

  @jax.jit
  def both(params, batch):
    logits = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    want = loss_lib.cross_entropy_sums(logits, batch["targets"], batch["loss_weights"])
    want["doc_ce"], want["doc_weight"] = loss_lib.per_document_sums(
        logits, batch["targets"], batch["loss_weights"], batch["segment_ids"])
    hidden = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                         return_hidden=True)
    w, eq = output_weights(params, MODEL)
    return chunked_loss.eval_sums(hidden, w, batch, eq=eq, chunk_len=6, dtype=jnp.float32,
                                  per_document=True), want

  got, want = both(params, batch)
  assert_trees_close(got, {k: want[k] for k in got}, rel=1e-6)


def test_logits_of_the_whole_batch_never_exist():
  params = random_params(MODEL, 0)
  batch = _batch()
  full_logits = 2 * 32 * MODEL.vocab_size  # elements of [B, L, V]

  def biggest(cfg):
    objective = objectives.language_model(cfg)
    f = jax.value_and_grad(lambda p: objective.sums(p, {}, batch, None)["loss"])
    eqns = _eqns(jax.make_jaxpr(f)(params).jaxpr)
    # The largest value with a vocabulary axis (attention's [L, L] scores are another matter).
    return max(math.prod(v.aval.shape) for e in eqns for v in e.outvars
               if MODEL.vocab_size in getattr(v.aval, "shape", ()))

  assert biggest(MODEL) >= full_logits  # the control: the plain loss holds [B, L, V]
  assert biggest(dataclasses.replace(MODEL, loss_chunk_len=8)) == full_logits // 4  # one chunk
