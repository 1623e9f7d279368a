"""The jitted train and eval steps.

The loss of a step is sum(w * ce) / sum(w) over the whole global batch. With gradient
accumulation each microbatch's gradient is of its own weighted sum divided by the *global*
weight, so k microbatches add up to exactly the gradient of the full batch.
"""

import contextlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from llm_jax import sharding
from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder
from llm_jax.train import loss as loss_lib

BATCH_KEYS = ("inputs", "targets", "loss_weights", "segment_ids", "positions")


@contextlib.contextmanager
def mesh_context(mesh, rules):
  """Tracing context: the mesh for sharding constraints and the logical -> mesh axis rules
  the model's `nn.with_logical_constraint` calls read."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def _forward_sums(model: Decoder, params, batch, z_loss: float):
  logits_BxLxV = model.apply({"params": params}, batch["inputs"], batch["positions"],
                             batch["segment_ids"])
  return loss_lib.cross_entropy_sums(logits_BxLxV, batch["targets"], batch["loss_weights"], z_loss)


def make_train_step(model_cfg: ModelConfig, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, *, grad_accum: int = 1, z_loss: float = 0.0
                    ) -> Callable[[Any, dict], tuple[Any, dict]]:
  """(state, batch) -> (new state, metrics). Not jitted; see `jit_train_step`."""
  model = Decoder(model_cfg)

  def loss_fn(params, batch, total_weight):
    sums = _forward_sums(model, params, batch, z_loss)
    return sums["loss"] / total_weight, sums

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch):
    params = state["params"]
    # A batch with no trained token would divide by zero; max(., 1) makes it a zero update.
    total_weight = jnp.maximum(jnp.sum(batch["loss_weights"].astype(jnp.float32)), 1.0)
    if grad_accum == 1:
      (_, sums), grads = grad_fn(params, batch, total_weight)
    else:
      B = batch["inputs"].shape[0]
      # Row r goes to microbatch r % k: every microbatch keeps rows from every data shard.
      micro = jax.tree.map(
          lambda x: x.reshape(B // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)

      def body(carry, mb):
        g_acc, s_acc = carry
        (_, sums), g = grad_fn(params, mb, total_weight)
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, sums)), None

      zeros_g = jax.tree.map(jnp.zeros_like, params)
      zeros_s = {k: jnp.zeros((), jnp.float32) for k in ("loss", "ce", "correct", "weight")}
      (grads, sums), _ = jax.lax.scan(body, (zeros_g, zeros_s), micro)

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    weight = jnp.maximum(sums["weight"], 1.0)
    metrics = {
        "loss": sums["ce"] / weight,
        "z_loss": (sums["loss"] - sums["ce"]) / weight,
        "accuracy": sums["correct"] / weight,
        "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(new_params),
        "learning_rate": schedule(state["step"]),
        "trained_tokens": sums["weight"],
        "padding_share": jnp.mean((batch["segment_ids"] == 0).astype(jnp.float32)),
    }
    new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
    return new_state, metrics

  return train_step


def _batch_shardings(mesh, rules) -> dict:
  return {k: sharding.batch_sharding(mesh, rules) for k in BATCH_KEYS}


def jit_train_step(train_step, state_shardings, mesh, rules):
  replicated = NamedSharding(mesh, P())
  batch_sh = _batch_shardings(mesh, rules)
  return jax.jit(train_step, in_shardings=(state_shardings, batch_sh),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)


def make_eval_step(model_cfg: ModelConfig, param_shardings, mesh, rules, *,
                   per_document: bool = False):
  """(params, batch) -> weighted sums (ce, correct, weight), plus per-document sums if asked."""
  model = Decoder(model_cfg)

  def eval_step(params, batch):
    logits_BxLxV = model.apply({"params": params}, batch["inputs"], batch["positions"],
                               batch["segment_ids"])
    sums = loss_lib.cross_entropy_sums(logits_BxLxV, batch["targets"], batch["loss_weights"])
    if per_document:
      sums["doc_ce"], sums["doc_weight"] = loss_lib.per_document_sums(
          logits_BxLxV, batch["targets"], batch["loss_weights"], batch["segment_ids"])
    return sums

  batch_sh = _batch_shardings(mesh, rules)
  return jax.jit(eval_step, in_shardings=(param_shardings, batch_sh),
                 out_shardings=NamedSharding(mesh, P()))


def to_global(batch: dict, mesh, rules) -> dict:
  """Per-process numpy rows -> one global jax.Array per key (multi-host safe)."""
  sh = sharding.batch_sharding(mesh, rules)
  return {k: jax.make_array_from_process_local_data(sh, batch[k]) for k in BATCH_KEYS}
