"""Training: one loop, several objectives (layer L3: imports the foundations, model/, data/ and
rundir.py; never infer/ or anything above).

  loop.py            train_and_evaluate: the loop every training job runs
  run_setup.py       what a job resolves first: tokenizer, model shape, init_from, the objective
  objectives.py      the Objective type and the language-model loss; dpo.py, distill.py
  loss.py            token-weighted cross-entropy sums; chunked_loss.py without [B, L, V] logits
  state.py           the sharded train state; lora_state.py with adapters over a frozen base
  frozen.py          never-trained trees a post-training objective reads (reference, teacher)
  optimizer.py       AdamW, schedules, clipping, the weight-decay mask
  step.py            the jitted train step (gradient accumulation)
  evaluate.py        held-out evaluation of any objective (also the eval job's loss task)
  metrics.py         throughput, MFU, the console line; writers.py sends them
  wandb_writer.py    the same scalars to Weights & Biases (optional, config.metrics.wandb_project)
  bench.py           `python -m llm_jax.train.bench` (bench_torch.py: the PyTorch side)
"""
