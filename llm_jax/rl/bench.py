"""Where a GRPO step's time goes: rollout tokens/s (sampling with the KV-cache Generator) and
train tokens/s (the GRPO objective's forward + backward + AdamW), at a model preset's shape with
random weights.

  python -m llm_jax.rl.bench --preset=minimind-26m

A step: `prompts` random prompts of `prompt_len` tokens, `generations` completions each of exactly
`max_new` tokens (no stop token, so every step decodes the same amount), then one train step on
the [prompts * generations, prompt_len + max_new] batch with random advantages and the k3 KL
against a reference copy. Reported per step after a warm-up step (compilation excluded):
  rollout_tokens_per_s  generated tokens / sampling wall time
  train_tokens_per_s    batch tokens (prompt + completion) / train step wall time
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

_PRESET = flags.DEFINE_string("preset", "minimind-26m", "Model shape (configs/models.py).")
_VOCAB = flags.DEFINE_integer("vocab", 6400, "Vocabulary size (minimind's is 6400).")
_PROMPTS = flags.DEFINE_integer("prompts", 4, "Prompts per step.")
_GENERATIONS = flags.DEFINE_integer("generations", 8, "Completions per prompt.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Tokens per prompt.")
_MAX_NEW = flags.DEFINE_integer("max_new", 64, "Tokens per completion.")
_STEPS = flags.DEFINE_integer("steps", 2, "Measured steps (after one warm-up step).")


def main():
  from configs import base  # pylint: disable=g-import-not-at-top
  from llm_jax import sharding  # pylint: disable=g-import-not-at-top
  from llm_jax.infer.generate import Generator  # pylint: disable=g-import-not-at-top
  from llm_jax.infer.sampling import SamplingConfig  # pylint: disable=g-import-not-at-top
  from llm_jax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from llm_jax.rl.rollout import build_rows  # pylint: disable=g-import-not-at-top
  from llm_jax.train import grpo, optimizer as opt_lib, state as state_lib  # pylint: disable=g-import-not-at-top
  from llm_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  c = base.get_config(_PRESET.value)
  c.model.vocab_size = _VOCAB.value
  cfg = ModelConfig.from_config(c.model)
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))
  rules = tuple(tuple(r) for r in c.sharding_rules)
  tc = c.train
  tc.lr, tc.warmup_steps = 1e-5, 0
  opt, sched = opt_lib.make_optimizer(tc), opt_lib.make_schedule(tc)
  _, sh = state_lib.state_shardings(cfg, opt, mesh, rules)
  state = state_lib.create_state(cfg, opt, jax.random.key(0), sh, mesh, rules)
  state["frozen"] = {"reference": jax.tree.map(jnp.copy, state["params"])}
  objective = grpo.objective(cfg, kl_beta=0.04, max_new_tokens=_MAX_NEW.value)
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(cfg, opt, sched, objective=objective),
      {**sh, "frozen": {"reference": sh["params"]}}, mesh, rules)
  rows = _PROMPTS.value * _GENERATIONS.value
  seq_len = _PROMPT_LEN.value + _MAX_NEW.value
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, cfg.vocab_size, _PROMPT_LEN.value).tolist()
             for _ in range(_PROMPTS.value)]
  results = []
  for step in range(_STEPS.value + 1):
    t0 = time.perf_counter()
    gen = Generator(state["params"], cfg, mesh=mesh, rules=rules)
    gens = gen.generate([p for p in prompts for _ in range(_GENERATIONS.value)],
                        [SamplingConfig(temperature=1.0, max_new_tokens=_MAX_NEW.value,
                                        seed=step * rows + r) for r in range(rows)])
    t_roll = time.perf_counter() - t0
    batch = build_rows([p for p in prompts for _ in range(_GENERATIONS.value)],
                       [g.tokens for g in gens], [False] * rows, seq_len, 0)
    batch["advantages"] = rng.normal(size=rows).astype(np.float32)
    t0 = time.perf_counter()
    with sharding.mesh_context(mesh, rules):
      state, m = train_step(state, sharding.to_global(batch, mesh, rules))
      jax.block_until_ready(m)
    t_train = time.perf_counter() - t0
    generated = sum(len(g.tokens) for g in gens)
    if step:  # step 0 compiles
      results.append((generated / t_roll, rows * seq_len / t_train, t_roll, t_train))
  roll, train, t_r, t_t = (float(np.median(x)) for x in zip(*results))
  print(f"GRPO step at {_PRESET.value} (vocab {cfg.vocab_size}) on {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}: {rows} completions ({_PROMPTS.value} prompts x "
        f"{_GENERATIONS.value}) of {_MAX_NEW.value} tokens after {_PROMPT_LEN.value}-token prompts: "
        f"rollout {roll:,.0f} tokens/s ({t_r:.2f} s), train {train:,.0f} tokens/s "
        f"({t_t:.2f} s) per step")


if __name__ == "__main__":
  from llm_jax import console  # pylint: disable=g-import-not-at-top
  console.cli(main)
