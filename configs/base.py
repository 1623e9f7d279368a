"""Shared defaults for every job. Job files (`configs/sft.py`, ...) import this and change a few
fields; anything can be overridden on the command line with `--config.<path>=<value>`."""

import ml_collections

from configs import data as data_config
from configs import models

# Logical axis -> mesh axes. Parameters use the plain names, activations the `act_` names, so a
# weight's `embed` dimension can be sharded over fsdp while activations keep it whole.
SHARDING_RULES = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("exp", "expert"),  # the expert axis of MoE weights (expert parallelism)
    ("norm", None),
    ("layers", None),
    # activations
    ("act_batch", ("data", "fsdp", "expert")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_batch", ("data", "fsdp", "expert")),
    ("cache_length", None),
)


def get_config(model: str | None = None) -> ml_collections.ConfigDict:
  """`model`: a preset name from configs/models.py; job files pass on what follows the ':' in
  `--config=configs/sft.py:minimind-26m`."""
  c = ml_collections.ConfigDict()
  c.job = "sft"  # which job main.py runs: pretrain | sft | dpo | distill | eval
  c.seed = 0  # seeds parameter init, dropout-free training and data shuffling
  c.init_from = ""  # start from another run's parameters only (its workdir or a checkpoint dir)
  c.init_step = -1  # with init_from: which step to take; -1 is the latest

  c.model = models.get(model or "tiny")  # decoder shape; see configs/models.py for presets
  c.data = data_config.get_config()  # sources, tokenizer, packing; see configs/data.py

  c.train = ml_collections.ConfigDict()
  c.train.steps = 300  # optimizer steps in total
  c.train.lr = 3e-3  # peak learning rate
  c.train.schedule = "cosine"  # cosine | linear | constant (all after linear warmup)
  c.train.warmup_steps = 30  # linear warmup from 0 to lr
  c.train.min_lr_ratio = 0.1  # final lr as a fraction of lr (cosine and linear)
  c.train.b1 = 0.9  # AdamW beta1
  c.train.b2 = 0.95  # AdamW beta2
  c.train.eps = 1e-8  # AdamW epsilon
  c.train.weight_decay = 0.1  # decoupled weight decay
  c.train.decay_norms_and_embeddings = False  # also decay RMSNorm scales and embeddings
  c.train.grad_clip = 1.0  # clip by global gradient norm; 0 turns clipping off
  c.train.grad_accum = 1  # microbatches per step (the global batch is split into this many)
  c.train.z_loss = 0.0  # weight of the log(Z)^2 penalty that keeps logits small (PaLM uses 1e-4)
  c.train.log_every = 10  # steps between console/TensorBoard metric lines
  c.train.eval_every = 100  # steps between evaluations on held-out data; 0 turns them off
  c.train.eval_batches = 8  # batches per evaluation; 0 means the whole eval set

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 100  # steps between checkpoints (one is always written at the end)
  c.checkpoint.keep = 3  # how many recent checkpoints to keep
  c.checkpoint.async_save = True  # write checkpoints in the background while training goes on
  c.checkpoint.enabled = True  # False: write none (benchmarks)
  c.checkpoint.sigterm_wait = 20.0  # seconds a checkpoint being written may take after SIGTERM
  c.checkpoint.sigterm_input_wait = 5.0  # seconds to wait after SIGTERM for a batch the data pipeline owes; then stop without a new checkpoint

  c.metrics = ml_collections.ConfigDict()  # where training scalars go besides the console and TensorBoard
  c.metrics.wandb_project = ""  # a Weights & Biases project: log the same scalars there (needs pip install wandb; WANDB_MODE=offline keeps them local)
  c.metrics.wandb_entity = ""  # the W&B team or user; "" = your default
  c.metrics.wandb_name = ""  # the W&B run's name; "" = the work directory's name

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0  # LoRA adapter rank; 0 trains every parameter, > 0 only adapters (needs init_from)
  c.lora.alpha = 16.0  # adapter output scale is alpha / rank
  c.lora.dropout = 0.0  # dropout on the adapters' input, training only
  c.lora.targets = "q,k,v,o,gate,up,down"  # adapted layers, comma-separated; also embed, lm_head
  c.lora.init = "kaiming"  # A's init as in PEFT: kaiming (uniform) | gaussian (N(0, 1/rank))

  c.xla = ml_collections.ConfigDict()  # XLA flags, set before JAX starts (llm_jax/xla_flags.py)
  c.xla.preset = "auto"  # auto (the platform's: MaxText's GPU flags on a GPU, none on CPU/TPU) | gpu | tpu | cpu | none
  c.xla.flags = ""  # more XLA flags, "--xla_a=1 --xla_b=2"; any this jaxlib does not know is dropped with a warning

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel replicas; -1 takes the devices left over
  c.mesh.fsdp = 1  # parameter/optimizer sharding (ZeRO-3 style)
  c.mesh.expert = 1  # expert parallelism: MoE experts split over it, the batch too (must divide moe.n_experts)
  c.mesh.tensor = 1  # tensor parallelism over heads and MLP
  c.sharding_rules = SHARDING_RULES  # logical axis -> mesh axes
  return c
