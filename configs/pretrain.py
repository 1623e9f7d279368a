"""Pretraining on plain text (next-token loss on every token, documents packed into blocks).

Default: the embedded fictional encyclopedia's biographies. For your own corpus:
  --config.data.train=corpus.jsonl --config.data.text_field=text
"""

from configs import base


def get_config(model=None):
  c = base.get_config(model)
  c.job = "pretrain"
  c.data.mode = "pretrain"
  c.data.train = "builtin:bios"
  c.data.eval = "builtin:bios_eval"
  c.train.steps = 600
  return c
