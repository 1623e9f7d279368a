"""Two JAX processes (2 CPU devices each) train together through jax.distributed, as on a
multi-host TPU slice: the result equals one process replaying the same global batches."""

import os
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from llm_jax import sharding
from llm_jax.data import tokenizer as tok_lib
from llm_jax.model.config import ModelConfig
from llm_jax import checkpoint, rundir
from llm_jax.train import optimizer as opt_lib, state as state_lib, step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import multiprocess_worker  # noqa: E402
from tests.numerics import assert_close


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  d = tmp_path_factory.mktemp("mp")
  workdir, port = str(d / "run"), _free_port()
  procs = []
  for rank in range(2):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(rank), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "multiprocess_worker.py"), workdir, str(d)],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # one process died or hangs: show what each said
      for q in procs:
        q.kill()
      tails = []
      for q in procs:
        try:
          tails.append((q.communicate(timeout=30)[1] or "")[-3000:])
        except (ValueError, OSError, subprocess.TimeoutExpired) as e:  # already read
          tails.append(f"({e!r})")
      raise AssertionError(f"a worker hung; stderr of process 0:\n{tails[0]}\n"
                           f"process 1:\n{tails[1]}") from None
    assert p.returncode == 0, err[-4000:]
    outs.append([l.split() for l in out.splitlines() if l.startswith("RESULT")][0])
  batches = [np.load(str(d / f"batches_{r}.npz")) for r in range(2)]
  return workdir, outs, batches


def test_processes_agree_and_read_disjoint_shards(two_process_run):
  workdir, outs, batches = two_process_run
  assert [o[1:4] for o in outs] == [["0", "2", "4"], ["1", "2", "4"]]
  assert outs[0][4:] == outs[1][4:]  # the same global loss and eval loss on both processes
  assert batches[0]["inputs.0"].shape == (4, 64)  # each process holds half the global batch
  assert not np.array_equal(batches[0]["inputs.0"], batches[1]["inputs.0"])
  assert checkpoint.steps(workdir) == [5]


def test_two_processes_equal_one_process_on_the_same_global_batches(two_process_run):
  workdir, outs, batches = two_process_run
  cfg = multiprocess_worker.config()
  run_cfg = rundir.read_config(workdir)
  model_cfg = ModelConfig.from_config(run_cfg.model)
  tok = tok_lib.Tokenizer.load(os.path.join(workdir, "tokenizer.model"))  # process 0's, broadcast
  assert tok.vocab_size == model_cfg.vocab_size

  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}),
                            jax.devices()[:1])
  rules = tuple(tuple(r) for r in cfg.sharding_rules)
  opt, sched = opt_lib.make_optimizer(cfg.train), opt_lib.make_schedule(cfg.train)
  _, sh = state_lib.state_shardings(model_cfg, opt, mesh, rules)
  state = state_lib.create_state(model_cfg, opt, jax.random.key(cfg.seed), sh, mesh, rules)
  step = step_lib.jit_train_step(step_lib.make_train_step(model_cfg, opt, sched), sh, mesh, rules)
  with sharding.mesh_context(mesh, rules):
    for s in range(cfg.train.steps):
      global_batch = {k: np.concatenate([b[f"{k}.{s}"] for b in batches])
                      for k in step_lib.BATCH_KEYS}
      state, m = step(state, sharding.to_global(global_batch, mesh, rules))
  np.testing.assert_allclose(float(m["loss"]), float(outs[0][4]), rtol=1e-5)
  params, _ = rundir.load_params(workdir, 5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(jax.device_get(state["params"]))):
    assert_close(a, b, rel=1e-5)
