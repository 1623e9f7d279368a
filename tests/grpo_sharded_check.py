"""Run by test_grpo_run.py in a subprocess: 3 GRPO steps through the loop, on a data=2, fsdp=2,
tensor=2 mesh of 8 virtual CPU devices or on one device (argv: base run, workdir, "8" or "1").
Prints JSON: each step's sampled tokens digest and advantages, and the final parameters."""

import hashlib
import json
import os
import sys

if sys.argv[3] == "8":
  assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from llm_jax import rundir  # pylint: disable=g-import-not-at-top
from llm_jax.rl import rollout  # pylint: disable=g-import-not-at-top
from llm_jax.train import loop  # pylint: disable=g-import-not-at-top
from tests.test_grpo_run import grpo_cfg  # pylint: disable=g-import-not-at-top


def main():
  base, workdir, devices = sys.argv[1], sys.argv[2], sys.argv[3]
  c = grpo_cfg(base, steps=3, kl_beta=0.1)
  c.checkpoint.every = 3
  if devices == "8":
    c.mesh.update(data=2, fsdp=2, tensor=2)
  steps = []

  def hook(step, batch):
    steps.append({"tokens": hashlib.sha256(batch["inputs"].tobytes()).hexdigest(),
                  "advantages": batch["advantages"].tolist()})
  out = loop.train_and_evaluate(c, workdir, batch_hook=hook, rollout_factory=rollout.Rollout)
  params, _ = rundir.load_params(workdir, 3)
  np.savez(os.path.join(workdir, "params.npz"),
           **{str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))})
  print(json.dumps({"steps": steps, "loss": out["loss"], "kl": out["kl"],
                    "devices": jax.device_count()}))


if __name__ == "__main__":
  main()
