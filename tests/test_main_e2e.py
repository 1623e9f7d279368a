"""The README's commands, run as a user runs them (subprocesses), with fewer steps."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args):
  out = subprocess.run([sys.executable, "-m", "llm_jax.main", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-4000:]
  return out


def test_readme_sft_then_eval(tmp_path):
  run = str(tmp_path / "sft")
  out = _main("--config=configs/sft.py", f"--workdir={run}", "--config.train.steps=40",
              "--config.train.warmup_steps=5", "--config.train.eval_every=40",
              "--config.checkpoint.every=20")
  log = out.stderr
  assert "Compiled and ran the first train step" in log and "tokens/s" in log and "MFU" in log
  assert "checkpoint_manager.py" not in log  # library INFO chatter stays off the console
  for f in ("config.json", "tokenizer.model", "final_metrics.json"):
    assert os.path.exists(os.path.join(run, f)), f
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["20", "40"]
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(run, "tensorboard")))

  final = json.load(open(os.path.join(run, "final_metrics.json")))
  first, last = final["eval_history"][0], final["eval_history"][-1]
  assert (first["step"], last["step"]) == (0, 40)
  assert last["eval_loss"] < first["eval_loss"] - 2.0, final["eval_history"]

  _main("--config=configs/eval.py", f"--workdir={run}", "--config.eval.max_batches=8")
  res = json.load(open(os.path.join(run, "eval_40.json")))
  # The eval job reads the checkpoint back and scores the same 8 held-out batches.
  assert abs(res["loss"] - last["eval_loss"]) < 1e-4
  assert abs(res["perplexity"] - math.exp(res["loss"])) < 1e-3 * res["perplexity"]
  assert 0 < res["accuracy"] < 1 and res["documents"] > 0
  assert res["doc_mean_loss"] > 0 and res["data"] == "builtin:bios_qa_heldout"
