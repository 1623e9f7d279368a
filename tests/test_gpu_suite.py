"""The GPU suite (`python -m llm_jax.train.bench --suite=gpu`) end to end on the CPU with tiny
shapes and TensorFlow hidden, as on a stock JAX GPU image: every part runs, results.json holds its
figures, a second run resumes (skips what finished), and a part whose budget ends is resumed."""

import json
import os
import subprocess
import sys

from llm_jax.plan.search import POLICY_ORDER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDE = os.path.join(ROOT, "tests", "hide_packages")  # its sitecustomize hides $HIDE_PACKAGES


def _suite(out, *args, timeout=600):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([HIDE, ROOT]), HIDE_PACKAGES="tensorflow",
             JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "llm_jax.train.bench", "--suite=gpu", "--tiny",
                         f"--suite_dir={out}", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)


def test_tiny_suite_runs_every_part_writes_json_and_resumes(tmp_path):
  out = tmp_path / "suite"
  run = _suite(out)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  results = json.load(open(out / "results.json"))
  assert results["identity"]["tiny"] is True
  machine = results["machine"]
  assert machine["platform"] == "cpu" and machine["jax"] and machine["date"]
  parts = results["parts"]
  assert list(parts) == ["smoke", "train", "attention", "decode"]
  assert all(p["finished"] for p in parts.values()), parts

  smoke = parts["smoke"]["items"]["train_resume_generate"]
  assert (smoke["steps"], smoke["resumed_from"]) == (4, 2)
  assert 0 < smoke["loss"] < 10 and isinstance(smoke["text"], str)
  assert (out / "smoke_run" / "checkpoints" / "4").is_dir()

  for preset in ("qwen2-0.5b", "llama-1b"):
    r = parts["train"]["items"][preset]
    assert "error" not in r, r
    assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["compile_s"] > 0
    assert r["dtype"] == "bfloat16" and r["param_dtype"] == "float32"
    assert r["remat_policy"] in POLICY_ORDER and r["attention_kernel"] == "xla"  # CPU: no kernel
    assert r["planned_on"] == "H100" and r["final_loss"] > 0

  for length in ("64", "128"):
    r = parts["attention"]["items"][length]
    assert r["docs"] > 1
    impls = r["impls"]
    assert impls["cudnn"] == {"skipped": "needs a CUDA GPU"}
    for impl in ("pallas_gpu", "xla"):  # the Pallas kernel in interpret mode
      assert impls[impl]["fwd_bwd_s"] > 0 and not impls[impl].get("oom"), impls[impl]

  for name, batch in (("batch1", 1), ("batch4", 4)):
    r = parts["decode"]["items"][name]
    assert r["batch"] == batch and r["decode_tokens_per_s"] > 0 and r["ttft_s"] > 0

  assert "| measurement | result |" in run.stdout and "| train llama-1b" in run.stdout
  assert not list(out.glob("progress_*.json"))  # every child's progress merged

  again = _suite(out)  # everything finished: nothing runs again
  assert again.returncode == 0, again.stderr[-3000:]
  for part in ("smoke", "train", "attention", "decode"):
    assert f"[{part}] finished earlier" in again.stdout
  assert json.load(open(out / "results.json"))["parts"] == parts


def test_a_part_whose_budget_ends_is_resumed(tmp_path):
  out = tmp_path / "suite"
  cut = _suite(out, "--parts=attention", "--budget=attention=1")  # killed while it starts
  assert cut.returncode == 1
  assert "[attention] the budget of 1 s ended: reached nothing; not finished: 64, 128" in cut.stdout
  entry = json.load(open(out / "results.json"))["parts"]["attention"]
  assert entry["finished"] is False and entry["stopped"].startswith("budget after")
  assert "| attention: not finished |" in cut.stdout

  resumed = _suite(out, "--parts=attention")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  entry = json.load(open(out / "results.json"))["parts"]["attention"]
  assert entry["finished"] is True and set(entry["items"]) == {"64", "128"}
