"""Value checks run before any work starts, each naming the config field and the fix.

Unknown fields and wrong types are already refused by ml_collections (configs are locked and
typed); these catch values of the right type that cannot work.
"""

import ml_collections

from llm_jax import xla_flags
from llm_jax.console import ConfigError
from llm_jax.model import lora
from llm_jax.model.config import ModelConfig
from llm_jax.train.optimizer import SCHEDULES

# config.job -> the function that runs it: jobs.run.
JOBS = ("pretrain", "sft", "dpo", "distill", "grpo", "eval")


def _fail(field: str, value, why: str):
  raise ConfigError(f"config.{field}={value!r}: {why}")


def validate(c: ml_collections.ConfigDict) -> None:
  if c.job == "tokenizer":
    _fail("job", c.job, "the tokenizer job is now a command of its own: python -m "
          "llm_jax.data.train_tokenizer --input=FILES --vocab_size=N --out=DIR (a training job "
          "also trains one on its data when config.data.tokenizer.path is empty)")
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
                  "train.eval_every": t.eval_every, "train.eval_batches": t.eval_batches,
                  "checkpoint.sigterm_wait": c.checkpoint.get("sigterm_wait", 0),
                  "checkpoint.sigterm_input_wait": c.checkpoint.get("sigterm_input_wait", 0)}
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
  if c.get("xla") and c.xla.preset not in xla_flags.CHOICES:
    _fail("xla.preset", c.xla.preset, f"must be one of {xla_flags.CHOICES}")
  _validate_accel(c)
  _validate_lora(c)
  _validate_eval(c)
  _validate_post_training(c)
  _validate_grpo(c)
  # The model's own checks (shapes, MoE, RoPE scaling) before any work; vocab may come later.
  ModelConfig.from_config(c.model, vocab_size=c.model.vocab_size or 1)
  n_experts = c.model.moe.n_experts
  if c.mesh.expert > 1 and n_experts and n_experts % c.mesh.expert:
    _fail("mesh.expert", c.mesh.expert, f"must divide config.model.moe.n_experts={n_experts}")


def _validate_lora(c: ml_collections.ConfigDict) -> None:
  lc = c.lora
  if lc.rank < 0:
    _fail("lora.rank", lc.rank, "must be >= 0 (0 turns LoRA off)")
  if not lc.alpha > 0:
    _fail("lora.alpha", lc.alpha, "must be > 0 (the adapters are scaled by alpha / rank)")
  if not 0 <= lc.dropout < 1:
    _fail("lora.dropout", lc.dropout, "must be in [0, 1)")
  if lc.init not in lora.INITS:
    _fail("lora.init", lc.init, f"must be one of {lora.INITS}")
  lora.parse_targets(lc.targets)  # raises naming config.lora.targets
  if lc.rank > 0 and c.job != "eval" and not c.init_from:
    _fail("init_from", c.init_from, "LoRA (config.lora.rank > 0) adapts a base model: set it to "
          "the base's run directory (a training run, or llm_jax.convert.hf_import's output)")


def _validate_accel(c: ml_collections.ConfigDict) -> None:
  """Fused attention kernels and the chunked loss (llm_jax/model/kernels, train/chunked_loss.py)."""
  m = c.model
  if m.get("loss_chunk_len", 0) < 0:
    _fail("model.loss_chunk_len", m.loss_chunk_len, "must be >= 0 (0: full logits)")
  if m.get("attention") in ("splash", "pallas_gpu"):
    from llm_jax.model.kernels import dispatch  # pylint: disable=import-outside-toplevel
    _, why = dispatch.blocks(m, m.attention, c.data.seq_len)
    if why:
      _fail("data.seq_len", c.data.seq_len, f"config.model.attention={m.attention!r}: {why}; change "
            "the length or use --config.model.attention=auto")


def _validate_eval(c: ml_collections.ConfigDict) -> None:
  """The eval job's fields (configs/eval.py), and the embedded data's (every job)."""
  syn = c.data.synthetic
  if "unseen_fraction" in syn and not 0 <= syn.unseen_fraction < 1:
    _fail("data.synthetic.unseen_fraction", syn.unseen_fraction, "must be in [0, 1)")
  if syn.get("augment"):
    from llm_jax.data.builtin.bios import parse_augment  # pylint: disable=g-import-not-at-top
    parse_augment(syn.augment)
  if c.job != "eval":
    return
  e = c.eval
  for field in ("batch_size", "max_new_tokens", "rep_prefix", "rep_continuation", "rep_n",
                "loop_window"):
    if not e[field] > 0:
      _fail(f"eval.{field}", e[field], "must be > 0")
  for field in ("max_examples", "knowledge_people", "choice_shots", "max_batches"):
    if e[field] < 0:
      _fail(f"eval.{field}", e[field], "must be >= 0 (0 means all / none)")
  try:
    windows = [int(w) for w in str(e.rep_windows).split(",") if w.strip()]
  except ValueError:
    windows = []
  if not windows or min(windows) < 1:
    _fail("eval.rep_windows", e.rep_windows, "must be a comma list of positive ints, e.g. 16,32,128")
  if e.sample_temperature < 0:
    _fail("eval.sample_temperature", e.sample_temperature, "must be >= 0 (0 is greedy)")
  if not 0 < e.sample_top_p <= 1:
    _fail("eval.sample_top_p", e.sample_top_p, "must be in (0, 1]")
  choices = {"choice_format": ("letters", "cloze"), "choice_style": ("auto", "en", "zh"),
             "rouge_tokenizer": ("auto", "char", "word", "jieba"), "split": ("eval", "train")}
  for field, allowed in choices.items():
    if e[field] not in allowed:
      _fail(f"eval.{field}", e[field], "must be " + ", ".join(allowed[:-1]) + f" or {allowed[-1]}")
  from llm_jax.eval.tasks import parse_tasks  # pylint: disable=g-import-not-at-top
  parse_tasks(e.tasks)


def _validate_grpo(c: ml_collections.ConfigDict) -> None:
  """Online RL fields (configs/grpo.py)."""
  if c.job != "grpo":
    return
  from llm_jax.train import grpo  # pylint: disable=g-import-not-at-top
  g = c.grpo
  choices = {"advantage": grpo.ADVANTAGES, "loss": grpo.LOSSES,
             "loss_aggregation": grpo.AGGREGATIONS}
  for field, allowed in choices.items():
    if g[field] not in allowed:
      _fail(f"grpo.{field}", g[field], f"must be one of {allowed}")
  if g.num_generations < 2:
    _fail("grpo.num_generations", g.num_generations, "must be >= 2 (advantages compare the "
          "completions of one prompt)")
  if c.data.batch_size % g.num_generations:
    _fail("data.batch_size", c.data.batch_size, f"counts completions per step and must be a "
          f"multiple of config.grpo.num_generations={g.num_generations}")
  if g.max_new_tokens < 1 or g.max_new_tokens >= c.data.seq_len:
    _fail("grpo.max_new_tokens", g.max_new_tokens, f"must be in [1, config.data.seq_len="
          f"{c.data.seq_len}) (a row holds the prompt and its completion)")
  for field in ("clip_low", "clip_high", "kl_beta", "temperature"):
    if g[field] < 0:
      _fail(f"grpo.{field}", g[field], "must be >= 0")
  if g.clip_low >= 1:
    _fail("grpo.clip_low", g.clip_low, "must be < 1 (the ratio's lower bound is 1 - clip_low)")
  if g.temperature == 0:
    _fail("grpo.temperature", g.temperature, "must be > 0: the completions of a group must "
          "differ (greedy decoding gives G equal ones)")
  mu = g.iterations_per_batch
  if mu < 1:
    _fail("grpo.iterations_per_batch", mu, "must be >= 1")
  for field, v in (("checkpoint.every", c.checkpoint.every), ("train.steps", c.train.steps)):
    if v % mu:
      _fail(field, v, f"must be a multiple of config.grpo.iterations_per_batch={mu}: a "
            "rollout reused for several steps is saved (and resumed) only at its end")
  if not c.init_from and not c.data.tokenizer.path:
    _fail("init_from", c.init_from, "GRPO starts from a model that is sometimes right: set it to "
          "an SFT run (which also gives the tokenizer)")
  if c.data.eval:
    _fail("data.eval", c.data.eval, "the grpo job evaluates held-out prompts through "
          "config.grpo.eval_prompts; set data.eval to ''")


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
    if d.teacher and c.lora.rank:
      _fail("distill.teacher", d.teacher, "a teacher cannot be combined with LoRA yet (the "
            "frozen slot holds the LoRA base); distil from the teacher's traces, or set "
            "config.lora.rank=0")
