"""Value checks run before any work starts, each naming the config field and the fix.

Unknown fields and wrong types are already refused by ml_collections (configs are locked and
typed); these catch values of the right type that cannot work.
"""

import ml_collections

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
  for axis in ("data", "fsdp", "tensor"):
    v = c.mesh[axis]
    if v == 0 or v < -1:
      _fail(f"mesh.{axis}", v, "must be a positive device count, or -1 for the devices left over")
  _validate_post_training(c)


def _validate_post_training(c: ml_collections.ConfigDict) -> None:
  """DPO and distillation fields (configs/dpo.py, configs/distill.py)."""
  if c.data.mode == "dpo" and c.job != "dpo":
    _fail("data.mode", c.data.mode, "preference pairs train only in the dpo job (configs/dpo.py)")
  if c.job == "dpo":
    from llm_jax.train.dpo import LOSS_TYPES  # pylint: disable=g-import-not-at-top
    if not c.init_from:
      _fail("init_from", c.init_from, "DPO starts from a trained run, which is also its frozen "
            "reference model; e.g. --config.init_from=runs/sft")
    if c.data.mode != "dpo":
      _fail("data.mode", c.data.mode, "must be 'dpo' for the dpo job (pairs are read and "
            "packed whole)")
    d = c.dpo
    if not d.beta > 0:
      _fail("dpo.beta", d.beta, "must be > 0")
    if d.loss_type not in LOSS_TYPES:
      _fail("dpo.loss_type", d.loss_type, f"must be one of {LOSS_TYPES}")
    if not 0 <= d.label_smoothing < 0.5:
      _fail("dpo.label_smoothing", d.label_smoothing, "must be in [0, 0.5)")
    if d.label_smoothing and d.loss_type != "sigmoid":
      _fail("dpo.label_smoothing", d.label_smoothing, "applies to loss_type='sigmoid' only")
  if c.job == "distill":
    d = c.distill
    if c.data.mode != "sft":
      _fail("data.mode", c.data.mode, "must be 'sft' for the distill job (loss on the assistant's "
            "reasoning and answer)")
    if not d.tag_weight > 0:
      _fail("distill.tag_weight", d.tag_weight, "must be > 0 (1 weights tags like other tokens)")
    if not 0 <= d.alpha <= 1:
      _fail("distill.alpha", d.alpha, "must be in [0, 1]")
    if not d.temperature > 0:
      _fail("distill.temperature", d.temperature, "must be > 0")
