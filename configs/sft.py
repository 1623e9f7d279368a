"""Supervised fine-tuning on chats, loss on the assistant's tokens only.

Default: trains from scratch on the embedded fictional-encyclopedia QA chats (no downloads) and
evaluates on the QA of held-out people. Point it at your data with
  --config.data.train=my_chats.jsonl --config.data.eval=my_eval.jsonl
and at a pretrained run with --config.init_from=runs/pretrain.
"""

from configs import base


def get_config(model=None):
  c = base.get_config(model)
  c.job = "sft"
  c.data.mode = "sft"
  c.data.train = "builtin:bios_qa_train"
  c.data.eval = "builtin:bios_qa_heldout"
  return c
