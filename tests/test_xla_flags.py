"""XLA flags that cannot crash a run: an unknown flag in XLA_FLAGS aborts the process when JAX
starts; llm_jax/xla_flags.py checks a preset's flags against the running jaxlib first and drops
the unknown ones with one warning line."""

import json
import os
import subprocess
import sys

import pytest

from llm_jax import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOGUS = "--xla_llm_jax_no_such_flag=1"
# A flag MaxText's GPU scripts set that jaxlib 0.10.2 no longer knows.
GONE = "--xla_gpu_enable_triton_softmax_fusion=false"


@pytest.fixture(name="cache", scope="module")
def _cache(tmp_path_factory):
  """One cache directory for this file's tests: each flag is checked once, as on a machine."""
  return str(tmp_path_factory.mktemp("cache"))


def test_an_unknown_flag_aborts_jax_without_the_check():
  """The hazard itself: XLA_FLAGS with an unknown flag kills the process at backend start."""
  out = subprocess.run([sys.executable, "-c", "import jax; jax.devices(); print('started')"],
                       env=dict(os.environ, XLA_FLAGS=BOGUS, JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode != 0 and "started" not in out.stdout
  assert "Unknown flag" in out.stderr and "xla_llm_jax_no_such_flag" in out.stderr


def test_check_sorts_flags_by_this_jaxlib_and_caches_the_answer(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  flags = ["--xla_gpu_enable_latency_hiding_scheduler=true", BOGUS, "--xla_gpu_enable_command_buffer=",
           "--xla_gpu_graph_level=0"]
  known, unknown = xla_flags.check(flags)
  assert known == ["--xla_gpu_enable_latency_hiding_scheduler=true", "--xla_gpu_enable_command_buffer="]
  assert unknown == [BOGUS, "--xla_gpu_graph_level=0"]  # graph_level: command_buffer's old name
  cached = json.load(open(xla_flags.cache_path()))
  assert len(cached) == 1 and set(next(iter(cached.values()))) == set(flags)

  def no_probe(*args):
    raise AssertionError("the cached answer should be used")

  monkeypatch.setattr(xla_flags, "_probe", no_probe)
  assert xla_flags.check(flags[::-1]) == (known[::-1], unknown[::-1])


def test_every_gpu_preset_setting_is_known_to_this_jaxlib(cache, monkeypatch):
  """The GPU preset as shipped sets every setting on the pinned jaxlib (one spelling each)."""
  monkeypatch.setenv("XDG_CACHE_HOME", cache)
  known, _ = xla_flags.check([s for entry in xla_flags.GPU_PRESET for s in entry])
  for entry in xla_flags.GPU_PRESET:
    assert any(s in known for s in entry), entry


def test_apply_keeps_the_users_flags_and_drops_unknown_ones(cache, monkeypatch, caplog):
  monkeypatch.setenv("XDG_CACHE_HOME", cache)
  monkeypatch.setattr(xla_flags, "_applied", {})
  monkeypatch.setattr(xla_flags, "backends_started", lambda: False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=true")  # the user's: it wins
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  result = xla_flags.apply("gpu", f"{BOGUS} {GONE}")
  assert result["dropped"] == [BOGUS, GONE]
  assert "--xla_gpu_enable_command_buffer=" in result["set"]
  assert not any(f.startswith("--xla_gpu_enable_triton_gemm") for f in result["set"])
  flags = os.environ["XLA_FLAGS"].split()
  assert flags[0] == "--xla_gpu_enable_triton_gemm=true" and flags[1:] == result["set"]
  assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9"
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert warnings == [f"XLA flags this jaxlib ({xla_flags._jaxlib_version()}) does not know, "
                      f"dropped: {BOGUS} {GONE}"]
  assert xla_flags.apply("gpu", f"{BOGUS} {GONE}") is result  # once per process


def test_a_preset_with_an_unknown_flag_trains_and_warns(tmp_path, cache):
  """A training command with the whole GPU preset (known flags, harmless on the CPU) and two flags
  this jaxlib does not know: it warns once, naming them, and trains."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XDG_CACHE_HOME=cache, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  args = ["--config.model.dim=32", "--config.model.n_layers=1", "--config.model.mlp_dim=64",
          "--config.data.seq_len=32", "--config.data.batch_size=2", "--config.data.tokenizer.vocab_size=600",
          "--config.data.synthetic.n_entities=20", "--config.train.steps=2", "--config.train.log_every=1",
          "--config.train.warmup_steps=1", "--config.train.eval_every=0", "--config.checkpoint.every=2"]
  out = subprocess.run([sys.executable, "-m", "llm_jax.main", "--config=configs/pretrain.py",
                        f"--workdir={tmp_path / 'run'}", "--config.xla.preset=gpu",
                        f"--config.xla.flags={BOGUS} {GONE}", *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  warnings = [l for l in out.stderr.splitlines() if "does not know" in l]
  assert len(warnings) == 1 and warnings[0].endswith(f"does not know, dropped: {BOGUS} {GONE}"), warnings
  assert "XLA flags for gpu (13, preset gpu)" in out.stderr
  assert json.load(open(tmp_path / "run" / "final_metrics.json"))["step"] == 2


def test_platform_follows_jax_platforms(monkeypatch):
  monkeypatch.setattr(xla_flags, "backends_started", lambda: False)
  for value, expected in (("cuda", "gpu"), ("cpu", "cpu"), ("tpu", "tpu"), ("cuda,cpu", "gpu")):
    monkeypatch.setenv("JAX_PLATFORMS", value)
    assert xla_flags.platform() == expected


def test_invalid_preset_names_the_field():
  with pytest.raises(ValueError, match="config.xla.preset='h100'"):
    xla_flags.apply("h100")
