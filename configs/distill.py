"""Reasoning distillation: SFT on traces whose assistant replies are `<think>reasoning</think>answer`
(minimind's r1 format, or OpenAI-style `reasoning_content`), with an extra loss weight on the
think tags; optionally also matching a teacher run's output distribution.

  python -m llm_jax.main --config=configs/distill.py --workdir=runs/distill --config.init_from=runs/sft

Default data: reasoning traces about the embedded encyclopedia's people; evaluation on traces
about held-out people. Your traces: --config.data.train=r1_traces.jsonl
"""

import ml_collections

from configs import base


def get_config(model=None):
  c = base.get_config(model)
  c.job = "distill"
  c.data.mode = "sft"  # loss on assistant tokens (reasoning, tags and answer)
  c.data.train = "builtin:bios_r1_train"  # reasoning traces about the training people
  c.data.eval = "builtin:bios_r1_heldout"  # traces about held-out people
  c.data.seq_len = 256  # tokens per packed row

  c.distill = ml_collections.ConfigDict()
  c.distill.tag_tokens = "<think>,</think>"  # comma-separated tags weighted extra; each one token
  c.distill.tag_weight = 10.0  # loss weight of a trained tag token (other trained tokens: 1)
  c.distill.teacher = ""  # a teacher run directory (same tokenizer) for logit distillation; "" = none
  c.distill.alpha = 0.5  # with a teacher: loss = (1 - alpha) * CE + alpha * T^2 * KL(teacher || student)
  c.distill.temperature = 2.0  # with a teacher: softmax temperature T of both distributions
  return c
