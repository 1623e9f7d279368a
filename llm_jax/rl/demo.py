"""SFT, then GRPO, on the embedded arithmetic word problems; held-out accuracy before and after.

  python -m llm_jax.rl.demo --workdir=runs/grpo_demo

1. SFT (configs/sft.py on builtin:arith_sft, a small model) in WORKDIR/sft.
2. GRPO (configs/grpo.py) from it in WORKDIR/grpo, the held-out greedy pass@1 every
   --eval_every steps (held-out draw of seed 0).
3. pass@1 (greedy) and pass@k (k samples at temperature 1) of both runs on the held-out number
   pairs, drawn with 3 seeds (other names, objects and wording each; arith.heldout).
4. WORKDIR/grpo_demo.png (reward and held-out accuracy by GRPO step) and WORKDIR/summary.json.

Every step is an ordinary job run (python -m llm_jax.main does the same); rerunning the command
resumes or reuses finished runs. `--quick` shrinks everything (the slow test).
"""

import json
import os
import platform
import time

import jax
import numpy as np
from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", "runs/grpo_demo", "Directory of the two runs and results.")
_SFT_STEPS = flags.DEFINE_integer("sft_steps", 600, "SFT optimizer steps.")
_GRPO_STEPS = flags.DEFINE_integer("grpo_steps", 40, "GRPO optimizer steps.")
_K = flags.DEFINE_integer("k", 8, "Samples per held-out problem for pass@k.")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Held-out draws to evaluate (comma-separated).")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 10, "GRPO steps between held-out evaluations.")
_QUICK = flags.DEFINE_bool("quick", False, "A shrunk run (tests): a few steps of each.")


def sft_config(steps: int, quick: bool):
  from configs import sft  # pylint: disable=g-import-not-at-top
  c = sft.get_config()
  c.data.train, c.data.eval = "builtin:arith_sft", ""
  c.data.tokenizer.vocab_size = 512
  c.data.seq_len, c.data.batch_size = 64, 32
  c.model.update(dim=96, n_layers=3, n_heads=4, n_kv_heads=2, mlp_dim=256)
  c.train.steps, c.train.warmup_steps, c.train.log_every = steps, min(30, steps), 25
  c.train.eval_every = 0
  c.checkpoint.every = steps
  if quick:
    c.model.update(dim=32, n_layers=2, mlp_dim=64)
  return c


def grpo_config(init_from: str, steps: int, eval_every: int, quick: bool):
  from configs import grpo  # pylint: disable=g-import-not-at-top
  c = grpo.get_config()
  c.init_from = init_from
  c.data.seq_len, c.data.batch_size = 80, 128
  c.train.steps, c.train.lr, c.train.log_every = steps, 3e-4, 5
  c.train.eval_every = eval_every
  c.checkpoint.every = steps
  c.grpo.max_new_tokens = 16
  if quick:
    c.data.batch_size = 16
    c.grpo.update(num_generations=4, max_new_tokens=12)
  return c


def heldout_accuracy(workdir: str, seeds: list[int], k: int, max_new: int) -> dict:
  """{"pass@1": [per seed], "pass@k": [per seed]} of a run on the held-out draws."""
  from llm_jax import rundir  # pylint: disable=g-import-not-at-top
  from llm_jax.data import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
  from llm_jax.data.builtin import arith  # pylint: disable=g-import-not-at-top
  from llm_jax.infer.generate import Generator  # pylint: disable=g-import-not-at-top
  from llm_jax.rl import accuracy, rewards  # pylint: disable=g-import-not-at-top
  run = rundir.load(workdir)
  gen = Generator(run.params, run.model_cfg)
  out = {"pass@1": [], f"pass@{k}": []}
  for seed in seeds:
    ps = prompts_lib.encode([(f"arith.heldout({seed}) #{i + 1}", r)
                             for i, r in enumerate(arith.heldout(seed))], run.tokenizer, 1 << 30)
    out["pass@1"].append(accuracy.pass_at_1_greedy(gen, run.tokenizer, ps, rewards.exact_answer,
                                                   max_new))
    out[f"pass@{k}"].append(accuracy.pass_at_k(gen, run.tokenizer, ps, rewards.exact_answer, k,
                                               max_new, seed=seed))
  return out


def plot(grpo_dir: str, path: str, title: str) -> None:
  from llm_jax.eval import curves, plots  # pylint: disable=g-import-not-at-top
  s = curves.read_scalars(grpo_dir)
  plt = plots.pyplot()
  fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
  steps, reward = s["reward"]
  ax[0].plot(steps, reward, marker=".", label="reward (mean over the step's completions)")
  if "frac_reward_zero_std" in s:
    ax[0].plot(*s["frac_reward_zero_std"], linestyle="--", label="frac_reward_zero_std")
  ax[0].set_xlabel("GRPO step")
  ax[0].set_title("training reward")
  ax[0].legend(fontsize=8)
  ax[1].plot(*s["eval_accuracy"], marker="o", color="C2")
  ax[1].set_xlabel("GRPO step (0 = the SFT model)")
  ax[1].set_title("held-out pass@1 (greedy, seed 0)")
  ax[1].set_ylim(0, 1)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  from llm_jax import jobs  # pylint: disable=g-import-not-at-top
  quick = _QUICK.value
  work = os.path.abspath(_WORKDIR.value)
  os.makedirs(work, exist_ok=True)
  seeds = [int(s) for s in _SEEDS.value.split(",") if s.strip()]
  sft_steps = 20 if quick else _SFT_STEPS.value
  grpo_steps = 4 if quick else _GRPO_STEPS.value
  eval_every = 2 if quick else _EVAL_EVERY.value
  k = 2 if quick else _K.value
  sft_dir, grpo_dir = os.path.join(work, "sft"), os.path.join(work, "grpo")
  t = {}
  t0 = time.perf_counter()
  jobs.run(sft_config(sft_steps, quick), sft_dir)
  t["sft_s"] = time.perf_counter() - t0
  g = grpo_config(sft_dir, grpo_steps, eval_every, quick)
  t0 = time.perf_counter()
  result = jobs.run(g, grpo_dir)
  t["grpo_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  before = heldout_accuracy(sft_dir, seeds, k, g.grpo.max_new_tokens)
  after = heldout_accuracy(grpo_dir, seeds, k, g.grpo.max_new_tokens)
  t["eval_s"] = time.perf_counter() - t0
  when = time.strftime("%Y-%m-%d")
  machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, jax {jax.__version__}"
  total = sum(t.values())
  summary = {"before": before, "after": after, "seeds": seeds, "k": k, "times_s": t,
             "total_s": total, "machine": machine, "date": when, "sft_steps": sft_steps,
             "grpo_steps": grpo_steps,
             "grpo_final": {key: result.get(key) for key in (
                 "reward", "frac_reward_zero_std", "kl", "rollout_tokens_per_s",
                 "train_tokens_per_s")},
             "eval_history": result.get("eval_history", [])}
  with open(os.path.join(work, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  png = os.path.join(work, "grpo_demo.png")
  plot(grpo_dir, png, f"SFT {sft_steps} steps then GRPO {grpo_steps} steps on arithmetic word "
       f"problems; {machine}; {when}; {total / 60:.1f} min in all")
  for name, acc in (("SFT", before), ("SFT + GRPO", after)):
    cells = " | ".join(f"{m} " + ", ".join(f"{v:.3f}" for v in vals) +
                       f" (mean {np.mean(vals):.3f})" for m, vals in acc.items())
    print(f"{name}: {cells}")
  print(f"times: SFT {t['sft_s']:.0f} s, GRPO {t['grpo_s']:.0f} s, held-out evaluation "
        f"{t['eval_s']:.0f} s; figure {png}; summary {os.path.join(work, 'summary.json')}")


if __name__ == "__main__":
  from llm_jax import console  # pylint: disable=g-import-not-at-top
  console.cli(main)
