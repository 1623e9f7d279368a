"""Online RL with verifiable rewards (GRPO and its variants) after SFT: the policy starts from
`init_from` (also the frozen reference of the KL term), samples `num_generations` completions per
prompt with its current parameters, and learns from their rewards.

  python -m llm_jax.main --config=configs/grpo.py --workdir=runs/grpo --config.init_from=runs/sft

Default task: the embedded arithmetic word problems (llm_jax/data/builtin/arith.py), rewarded
for the exact final answer; held-out accuracy (greedy pass@1) on problems over number pairs never
trained on. Your prompts: --config.grpo.prompts=prompts.jsonl (lines {"prompt": ...} or
{"messages": [...]}, plus the fields your rewards read, e.g. "answer"), rewards by name or
module:function (llm_jax/rl/rewards.py). The math: llm_jax/train/grpo.py.
"""

import ml_collections

from configs import base


def get_config(model=None):
  c = base.get_config(model)
  c.job = "grpo"
  c.data.train = ""  # unused: prompts come from config.grpo.prompts
  c.data.eval = ""  # unused: held-out prompts are config.grpo.eval_prompts
  c.data.seq_len = 128  # tokens per row: one prompt and its completion
  c.data.batch_size = 64  # completions per step (prompts per step = batch_size / num_generations)
  c.train.steps = 100  # optimizer steps
  c.train.lr = 3e-4  # peak learning rate
  c.train.warmup_steps = 5  # linear warmup
  c.train.schedule = "constant"  # RL keeps the rate (TRL's default is linear decay)
  c.train.weight_decay = 0.0  # the KL term anchors the policy
  c.train.log_every = 5  # steps between metric lines
  c.train.eval_every = 25  # steps between held-out accuracy evaluations
  c.checkpoint.every = 50  # steps between checkpoints

  c.grpo = ml_collections.ConfigDict()
  c.grpo.prompts = "builtin:arith_train"  # prompt set: .jsonl files or builtin:<name>, comma-separated
  c.grpo.eval_prompts = "builtin:arith_heldout"  # held-out prompts for eval_accuracy; "" = none
  c.grpo.eval_reward = "exact_answer"  # the reward whose value 1 counts as solved in eval_accuracy
  c.grpo.rewards = "exact_answer"  # built-in names or module:function, comma-separated
  c.grpo.reward_weights = ""  # comma-separated weights of the rewards; "" = 1 each
  c.grpo.number_tolerance = 1e-6  # the `number` reward: largest absolute error counted right
  c.grpo.format_pattern = r".*Answer: \S+"  # the `format` reward: regex the completion must fullmatch
  c.grpo.overlong_buffer = 16  # the `length_penalty` reward: tokens before max_new_tokens where it ramps to -1
  c.grpo.num_generations = 8  # completions per prompt (G)
  c.grpo.max_new_tokens = 32  # completion length at most; cut ones count in completions/clipped_ratio
  c.grpo.temperature = 1.0  # sampling temperature (also divides the trainer's logits, as TRL)
  c.grpo.top_k = 0  # sampling: keep the k most likely tokens; 0 = off
  c.grpo.top_p = 1.0  # sampling: nucleus mass; 1 = off
  c.grpo.advantage = "grpo"  # grpo (r - mean) / (std + 1e-6) | dr_grpo (r - mean) | rloo (leave-one-out)
  c.grpo.loss = "grpo"  # grpo (clipped token ratio) | gspo (sequence ratio) | cispo (clipped detached weight)
  c.grpo.clip_low = 0.2  # the ratio's lower clip is 1 - clip_low
  c.grpo.clip_high = 0.28  # the ratio's upper clip is 1 + clip_high (DAPO's clip-higher)
  c.grpo.kl_beta = 0.04  # weight of the k3 KL to the reference (init_from, or the LoRA base); 0 = none
  c.grpo.loss_aggregation = "token_mean"  # token_mean | seq_mean_token_mean | dr_grpo (sum / (rows * max_new_tokens))
  c.grpo.iterations_per_batch = 1  # optimizer steps per rollout (mu); > 1 clips against the rollout's log-probs
  return c
