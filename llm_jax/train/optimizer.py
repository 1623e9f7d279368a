"""AdamW with warmup + decay schedules, global-norm clipping and a weight-decay mask."""

import optax
from flax import traverse_util

SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(tc) -> optax.Schedule:
  """Linear warmup from 0 to `tc.lr`, then cosine / linear decay to lr * min_lr_ratio, or flat."""
  if tc.schedule not in SCHEDULES:
    raise ValueError(f"config.train.schedule={tc.schedule!r}: must be one of {SCHEDULES}")
  warmup = max(0, min(tc.warmup_steps, tc.steps))
  decay_steps = max(1, tc.steps - warmup)
  end = tc.lr * tc.min_lr_ratio
  if tc.schedule == "cosine":
    after = optax.cosine_decay_schedule(tc.lr, decay_steps, alpha=tc.min_lr_ratio)
  elif tc.schedule == "linear":
    after = optax.linear_schedule(tc.lr, end, decay_steps)
  else:
    after = optax.constant_schedule(tc.lr)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, tc.lr, warmup), after], [warmup])


def decay_mask(params, decay_norms_and_embeddings: bool = False):
  """True where weight decay applies: matrices, but by default not norm scales, biases or
  embeddings (decaying those hurts small models and buys nothing)."""
  flat = traverse_util.flatten_dict(params)

  def wants_decay(path) -> bool:
    name = path[-1]
    if name == "bias":
      return False
    if name in ("scale", "embedding"):
      return decay_norms_and_embeddings
    return True

  return traverse_util.unflatten_dict({k: wants_decay(k) for k in flat})


def make_optimizer(tc) -> optax.GradientTransformation:
  schedule = make_schedule(tc)
  parts = []
  if tc.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(tc.grad_clip))
  parts.append(optax.adamw(
      schedule, b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay,
      mask=lambda p: decay_mask(p, tc.decay_norms_and_embeddings)))
  return optax.chain(*parts)
