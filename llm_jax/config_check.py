"""Value checks run before any work starts, each naming the config field and the fix.

Unknown fields and wrong types are already refused by ml_collections (configs are locked and
typed); these catch values of the right type that cannot work.
"""

import ml_collections

from llm_jax.model.config import ModelConfig
from llm_jax.train.optimizer import SCHEDULES


def _fail(field: str, value, why: str):
  raise ValueError(f"config.{field}={value!r}: {why}")


def validate(c: ml_collections.ConfigDict) -> None:
  from llm_jax.jobs import JOBS
  if c.job not in JOBS:
    _fail("job", c.job, f"must be one of {JOBS}")
  t = c.train
  positive = {"train.steps": t.steps, "train.lr": t.lr, "train.grad_accum": t.grad_accum,
              "train.log_every": t.log_every, "checkpoint.every": c.checkpoint.every,
              "checkpoint.keep": c.checkpoint.keep, "data.batch_size": c.data.batch_size}
  for field, v in positive.items():
    if not v > 0:
      _fail(field, v, "must be > 0")
  non_negative = {"train.warmup_steps": t.warmup_steps, "train.weight_decay": t.weight_decay,
                  "train.grad_clip": t.grad_clip, "train.z_loss": t.z_loss,
                  "train.eval_every": t.eval_every, "train.eval_batches": t.eval_batches}
  for field, v in non_negative.items():
    if v < 0:
      _fail(field, v, "must be >= 0")
  if t.schedule not in SCHEDULES:
    _fail("train.schedule", t.schedule, f"must be one of {SCHEDULES}")
  if not 0 <= t.min_lr_ratio <= 1:
    _fail("train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
  for b in ("b1", "b2"):
    if not 0 <= t[b] < 1:
      _fail(f"train.{b}", t[b], "must be in [0, 1)")
  if c.data.batch_size % t.grad_accum:
    _fail("train.grad_accum", t.grad_accum,
          f"must divide config.data.batch_size={c.data.batch_size}")
  if c.data.seq_len < 2:
    _fail("data.seq_len", c.data.seq_len, "must be at least 2")
  for axis in ("data", "fsdp", "expert", "tensor"):
    v = c.mesh[axis]
    if v == 0 or v < -1:
      _fail(f"mesh.{axis}", v, "must be a positive device count, or -1 for the devices left over")
  # The model's own checks (shapes, MoE, RoPE scaling) before any work; vocab may come later.
  ModelConfig.from_config(c.model, vocab_size=c.model.vocab_size or 1)
  n_experts = c.model.moe.n_experts
  if c.mesh.expert > 1 and n_experts and n_experts % c.mesh.expert:
    _fail("mesh.expert", c.mesh.expert, f"must divide config.model.moe.n_experts={n_experts}")
