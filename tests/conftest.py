"""Shared fixtures: small saved runs that tests of the tools built on run directories use."""

import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_sft_config(workdir_tokenizer: str = "", steps: int = 80):
  """A small SFT job on the embedded encyclopedia: trains in seconds on a CPU."""
  from configs import sft as sft_config  # pylint: disable=g-import-not-at-top
  c = sft_config.get_config()
  c.model.dim, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 64, 2, 4, 2
  c.model.mlp_dim = 128
  c.data.seq_len, c.data.batch_size = 128, 8
  c.data.synthetic.n_entities = 60
  c.data.synthetic.qa_phrasings = 1  # one chat per fact: the tests' numbers predate the quick start's 4
  c.data.tokenizer.path = workdir_tokenizer
  c.data.tokenizer.vocab_size = 600
  c.train.steps, c.train.warmup_steps, c.train.log_every = steps, 5, 20
  c.train.lr = 1e-2
  c.train.eval_every = 0
  c.checkpoint.every = steps
  return c


@pytest.fixture(scope="session")
def trained_sft_run(tmp_path_factory) -> str:
  """A run directory holding a tiny SFT model trained for 80 steps (context 128 tokens)."""
  from llm_jax.train import loop  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("trained_sft"))
  loop.train_and_evaluate(tiny_sft_config(), workdir)
  return workdir


# `@pytest.mark.slow` tests (the walk of the commands of README.md and docs/) run only with `--run-slow`
# or LLM_JAX_SLOW=1.
def pytest_addoption(parser):
  parser.addoption("--run-slow", action="store_true", default=False,
                   help="also run tests marked slow (or set LLM_JAX_SLOW=1)")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: minutes long; runs only with --run-slow or LLM_JAX_SLOW=1")
  _share_compilations()


_CACHE_DIR = None


def _share_compilations():
  """One JAX persistent compilation cache for this test session, in a fresh temporary directory.

  Dozens of tests start trainers, chats and servers in subprocesses that compile the same tiny
  programs; with the cache each program compiles once per session (the executable is the same
  either way, so results do not change; the cache key covers XLA_FLAGS, so the 8-virtual-device
  tests get their own entries). Set in the environment so subprocesses inherit it. A cache the
  user set is kept."""
  global _CACHE_DIR
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  _CACHE_DIR = tempfile.mkdtemp(prefix="llm_jax_test_jit_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  # Train steps take seconds to compile; the many small helper programs are not worth a file.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
  if "jax" in sys.modules:  # imported by a plugin before this ran: its config read the env already
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)


def pytest_unconfigure(config):
  del config
  if _CACHE_DIR:
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  if config.getoption("--run-slow") or os.environ.get("LLM_JAX_SLOW") == "1":
    return
  skip = pytest.mark.skip(reason="slow: run with --run-slow or LLM_JAX_SLOW=1")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
