"""The memory and throughput planner: does a config fit on those devices, and sharded how?

  python -m llm_jax.plan --config=configs/pretrain.py:qwen2-0.5b --devices=8xH100

  __main__.py  the command: prints the plan and the overrides that select it
  search.py    every mesh a config can be laid out on, and the one that fits best
  memory.py    per-device bytes: the train state exactly, activations and logits estimated
Accelerators (names, memory, peak FLOP/s) come from llm_jax/devices.py.
"""
