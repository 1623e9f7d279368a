"""Supervised fine-tuning on chats, loss on the assistant's tokens only.

Default (the README's quick start): trains from scratch on the embedded fictional-encyclopedia QA
chats (no downloads) of 80 invented people, each fact asked four ways, and evaluates on the QA of
20 held-out people. In under 5 minutes on a 2-core CPU the model answers its 80 people's
questions (99% right) and not the held-out ones': fine-tuning taught it the facts it saw as
answers, and nothing else (pretraining first does better: docs/training.md). Point it at your data
with
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
  # The quick start's encyclopedia: few enough people (80 trained, 20 held out; the first 100 of
  # the 1,500 that configs/pretrain.py's biographies describe) for a 1M-parameter model to learn
  # every fact in 300 steps, each asked in all four phrasings so the model learns the person and
  # attribute, not one question string. A 2,048-piece tokenizer keeps Chinese answers in short
  # pieces shared across people (at 4,096 this small corpus makes "出生在杭州" one piece) and
  # trains 28% faster.
  c.data.synthetic.n_entities = 100
  c.data.synthetic.qa_phrasings = 4
  c.data.tokenizer.vocab_size = 2048
  return c
