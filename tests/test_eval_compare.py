"""`python -m llm_jax.eval.compare` (docs/eval.md): a run without an eval is one line naming it and
the command that makes its eval; the outputs go where --out says, and their paths are said."""

import json
import os
import subprocess
import sys

import pytest

from llm_jax.eval import compare
from tests.conftest import ROOT


def _eval_json(run_dir, step, tasks):
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, f"eval_{step}.json"), "w", encoding="utf-8") as f:
    json.dump({"step": step, "tasks": tasks}, f)


def test_run_without_eval_names_the_run_and_the_command(tmp_path, monkeypatch):
  (tmp_path / "runs" / "a").mkdir(parents=True)
  _eval_json(tmp_path / "runs" / "b", 30, {"loss": {"loss": 2.0}})
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError) as e:
    compare.compare(["runs/b", "runs/a"], [], ["loss.loss"], "cmp")
  assert str(e.value) == ("runs/a has no eval yet (no eval_<step>.json in it); make one with: "
                          "python -m llm_jax.main --config=configs/eval.py --workdir=runs/a")
  with pytest.raises(ValueError, match=r"runs/b's latest eval \(step 30\) has no knowledge task "
                     r"\(it has loss\); add it with: python -m llm_jax.main "
                     r"--config=configs/eval.py --workdir=runs/b --config.eval.tasks=knowledge"):
    compare.compare(["runs/b"], [], ["knowledge.qa_heldout.contains"], "cmp")
  with pytest.raises(FileNotFoundError, match="runs/c: no such run directory"):
    compare.compare(["runs/c"], [], ["loss.loss"], "cmp")
  assert not list(tmp_path.glob("cmp*"))  # nothing written on an error


def test_outputs_go_where_asked_and_are_said(tmp_path):
  for name, loss in (("a", 2.5), ("b", 2.0)):
    _eval_json(tmp_path / "runs" / name, 30, {"loss": {"loss": loss}})
  cwd = tmp_path / "elsewhere"
  cwd.mkdir()
  out = str(tmp_path / "reports" / "cmp")
  # the command as a user runs it, from another directory: one-line error, then the paths said
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  runs = f"{tmp_path}/runs/a,{tmp_path}/runs/b"
  cmd = [sys.executable, "-m", "llm_jax.eval.compare", f"--runs={runs},{tmp_path}/runs/none",
         "--metrics=loss.loss", f"--out={out}"]
  bad = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0, bad.stderr
  assert bad.stderr.startswith(f"error: {tmp_path}/runs/none: no such run directory")
  cmd[3] = f"--runs={runs}"
  good = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
  assert good.returncode == 0, good.stderr
  paths = [out + ext for ext in (".md", ".csv", ".png")]
  assert f"written: {', '.join(paths)}" in good.stdout
  assert all(os.path.exists(p) for p in paths) and not os.listdir(cwd)
  assert "| a | 30 | 2.500 |" in open(paths[0], encoding="utf-8").read()
