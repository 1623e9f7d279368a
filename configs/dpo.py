"""Direct Preference Optimization after SFT: the policy starts from `init_from`, which is also the
frozen reference model.

  python -m llm_jax.main --config=configs/dpo.py --workdir=runs/dpo --config.init_from=runs/sft

Default data: preference pairs about the embedded encyclopedia's people (the true answer chosen,
a wrong one rejected); evaluation on pairs about held-out people. Your pairs (TRL, minimind or
LLaMA-Factory shapes, see llm_jax/data/preference.py):
  --config.data.train=pairs.jsonl --config.data.eval=heldout_pairs.jsonl
"""

import ml_collections

from configs import base


def get_config(model=None):
  c = base.get_config(model)
  c.job = "dpo"
  c.data.mode = "dpo"  # read every record as a preference pair; pack pairs whole
  c.data.train = "builtin:bios_dpo_train"  # preference pairs about the training people
  c.data.eval = "builtin:bios_dpo_heldout"  # pairs about held-out people
  c.data.seq_len = 256  # tokens per row; a pair's chosen + rejected share one row
  c.train.steps = 200  # optimizer steps
  c.train.lr = 2e-4  # peak learning rate (DPO wants a much lower rate than SFT)
  c.train.warmup_steps = 20  # linear warmup
  c.train.weight_decay = 0.0  # no decay: the reference anchors the policy already
  c.train.eval_every = 50  # steps between held-out pair evaluations
  c.train.eval_batches = 16  # held-out batches per evaluation (about 900 of the 3,600 pairs); 0 = all
  c.checkpoint.every = 100  # steps between checkpoints

  c.dpo = ml_collections.ConfigDict()
  c.dpo.beta = 0.1  # inverse temperature of the implicit reward beta * log(pi / pi_ref)
  c.dpo.loss_type = "sigmoid"  # sigmoid (DPO) | ipo (squared loss on length-averaged log-ratios)
  c.dpo.label_smoothing = 0.0  # sigmoid only: assumed share of flipped labels (conservative DPO)
  return c
