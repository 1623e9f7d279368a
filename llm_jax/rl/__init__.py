"""Online RL with verifiable rewards: the rollout stage, reward functions, held-out accuracy.

The objective itself is train/grpo.py; this room joins it to the sampler (infer/), which train/
never imports.
"""
