"""The jitted train step (held-out evaluation: evaluate.py).

The loss of a step is the objective's sum over the whole global batch divided by its global
normalizer (for the LM objective: sum(w * ce) / sum(w)). With gradient accumulation each
microbatch's gradient is of its own sum divided by the *global* normalizer, so k microbatches
add up to exactly the gradient of the full batch. See objectives.py.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from llm_jax import sharding
from llm_jax.model.config import ModelConfig
from llm_jax.train import objectives

BATCH_KEYS = ("inputs", "targets", "loss_weights", "segment_ids", "positions")


def make_train_step(model_cfg: ModelConfig, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, *, grad_accum: int = 1, z_loss: float = 0.0,
                    objective: objectives.Objective | None = None
                    ) -> Callable[[Any, dict], tuple[Any, dict]]:
  """(state, batch) -> (new state, metrics). Not jitted; see `jit_train_step`.

  `objective` defaults to the language-model loss (with `z_loss`). The state may hold a
  "frozen" entry: parameters the objective reads but the optimizer never touches.
  """
  objective = objective or objectives.language_model(model_cfg, z_loss=z_loss)

  def loss_fn(params, frozen, batch, normalizer, rng):
    sums = objective.sums(params, frozen, batch, rng)
    return sums["loss"] / normalizer, sums

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch):
    params, frozen = state["params"], state.get("frozen", {})
    rng = jax.random.fold_in(jax.random.key(0), state["step"])
    # A batch with nothing to train on would divide by zero; max(., 1) makes it a zero update.
    normalizer = jnp.maximum(objective.normalizer(batch), 1.0)
    if grad_accum == 1:
      (_, sums), grads = grad_fn(params, frozen, batch, normalizer, rng)
    else:
      B = jax.tree.leaves(batch)[0].shape[0]
      # Row r goes to microbatch r % k: every microbatch keeps rows from every data shard.
      micro = jax.tree.map(
          lambda x: x.reshape(B // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)

      def body(carry, mb_and_i):
        mb, i = mb_and_i
        g_acc, s_acc = carry
        (_, sums), g = grad_fn(params, frozen, mb, normalizer, jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, sums)), None

      zeros_g = jax.tree.map(jnp.zeros_like, params)
      zeros_s = {k: jnp.zeros((), jnp.float32) for k in objective.sum_keys}
      (grads, sums), _ = jax.lax.scan(body, (zeros_g, zeros_s), (micro, jnp.arange(grad_accum)))

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    metrics = {
        **objective.metrics(sums),
        "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(new_params),
        "learning_rate": schedule(state["step"]),
    }
    if "segment_ids" in batch:
      metrics["padding_share"] = jnp.mean((batch["segment_ids"] == 0).astype(jnp.float32))
    new_state = {**state, "step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
    return new_state, metrics

  return train_step


def jit_train_step(train_step, state_shardings, mesh, rules):
  replicated = NamedSharding(mesh, P())
  batch_sh = sharding.row_sharding(mesh, rules)  # a prefix of the whole batch dict
  return jax.jit(train_step, in_shardings=(state_shardings, batch_sh),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)
