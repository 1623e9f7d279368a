"""Timing of the real sharded train step on synthetic packed batches: what `python -m
llm_jax.train.bench` prints and the GPU suite (bench_suite.py) records. Figures, never asserted."""

import dataclasses
import resource
import time

import jax
import numpy as np

from llm_jax import devices, sharding
from llm_jax.model import flops
from llm_jax.model.config import ModelConfig
from llm_jax.train import optimizer as opt_lib
from llm_jax.train import state as state_lib, step as step_lib


def synthetic_batch(batch: int, seq_len: int, vocab: int, docs_per_row: int, seed: int = 0) -> dict:
  """Random tokens in rows of `docs_per_row` packed documents of random lengths."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(0, vocab, (batch, seq_len), dtype=np.int32)
  seg = np.zeros((batch, seq_len), np.int32)
  pos = np.zeros((batch, seq_len), np.int32)
  for r in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, seq_len), docs_per_row - 1, replace=False))
    for d, (a, b) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, seq_len])):
      seg[r, a:b] = d + 1
      pos[r, a:b] = np.arange(b - a)
  return {"inputs": inputs, "targets": np.roll(inputs, -1, axis=1),
          "loss_weights": np.ones((batch, seq_len), np.float32), "segment_ids": seg,
          "positions": pos}


def peak_memory() -> str:
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return f"{stats['peak_bytes_in_use'] / 2**30:.2f} GiB (device 0)"
  return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (host peak RSS)"


def compiled_memory(compiled) -> str:
  """Per-device bytes XLA's buffer assignment gives the step: arguments (state and batch) and
  temporaries (activations kept for the backward pass, logits, workspace), on any backend."""
  m = compiled.memory_analysis()
  if m is None:
    return "n/a"
  return (f"{m.argument_size_in_bytes / 2**30:.3f} GiB arguments + "
          f"{m.temp_size_in_bytes / 2**30:.3f} GiB temporaries (per device)")


def timed_steps(compiled, state, batch, steps: int):
  """(state, metrics, seconds of each step): every step waits for its result, like PyTorch's."""
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return state, m, times


@dataclasses.dataclass
class Prepared:
  """A compiled train step on a synthetic packed batch, ready to time."""
  model_cfg: ModelConfig
  mesh: jax.sharding.Mesh
  rules: tuple
  state: dict
  batch: dict
  host: dict  # the batch as numpy rows (this process's)
  compiled: object
  compile_s: float
  peak: float  # peak FLOP/s of the devices (devices.peak_flops)
  peak_source: str


def prepare(config, docs_per_row: int) -> Prepared:
  """Creates the state of `config` on its mesh and compiles its train step (timed)."""
  vocab = config.model.vocab_size or config.data.tokenizer.vocab_size
  with config.unlocked():
    config.model.vocab_size = vocab
  model_cfg = ModelConfig.from_config(config.model)
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  tc = config.train
  optimizer, schedule = opt_lib.make_optimizer(tc), opt_lib.make_schedule(tc)
  B, L = config.data.batch_size, config.data.seq_len
  peak, source = devices.peak_flops(model_cfg.dtype)  # first, while nothing else runs here
  host = synthetic_batch(B // jax.process_count(), L, vocab, docs_per_row, seed=jax.process_index())
  _, sh = state_lib.state_shardings(model_cfg, optimizer, mesh, rules)  # outside the mesh context
  with sharding.mesh_context(mesh, rules):
    state = state_lib.create_state(model_cfg, optimizer, jax.random.key(0), sh, mesh, rules)
    step = step_lib.jit_train_step(step_lib.make_train_step(
        model_cfg, optimizer, schedule, grad_accum=tc.grad_accum, z_loss=tc.z_loss), sh, mesh, rules)
    batch = sharding.to_global(host, mesh, rules)
    t = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
  return Prepared(model_cfg, mesh, rules, state, batch, host, compiled, compile_s, peak, source)


def measure(config, steps: int = 10, docs_per_row: int = 4, seconds: float | None = None) -> dict:
  """The figures of `config`'s train step: compile time, median step time over `steps` timed steps
  (fewer, at least 2, when `seconds` of stepping run out), tokens/s, MFU, peak and XLA memory."""
  p = prepare(config, docs_per_row)
  B, L = config.data.batch_size, config.data.seq_len
  with sharding.mesh_context(p.mesh, p.rules):
    state, m = p.compiled(p.state, p.batch)  # warm-up
    jax.block_until_ready(m)
    times, start = [], time.perf_counter()
    while len(times) < steps and (seconds is None or len(times) < 2
                                  or time.perf_counter() - start < seconds):
      state, m, t = timed_steps(p.compiled, state, p.batch, 1)
      times += t
  step_s = float(np.median(times))
  fpt = flops.flops_per_token(p.model_cfg, L)
  tok_s = B * L / step_s
  stats = jax.local_devices()[0].memory_stats() or {}
  analysis = p.compiled.memory_analysis()
  counts = flops.param_counts(state["params"])
  return {
      "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
      "parameters": counts["total"], "batch": B, "seq_len": L, "grad_accum": config.train.grad_accum,
      "dtype": p.model_cfg.dtype, "param_dtype": p.model_cfg.param_dtype,
      "attention": config.model.attention, "remat_policy": config.model.remat_policy,
      "loss_chunk_len": config.model.loss_chunk_len, "compile_s": p.compile_s,
      "step_s": step_s, "steps_timed": len(times), "tokens_per_s": tok_s,
      "model_tflops_per_s": fpt * tok_s / 1e12, "mfu": fpt * tok_s / p.peak,
      "peak_tflops_per_s": p.peak / 1e12, "peak_source": p.peak_source,
      "peak_memory_bytes": stats.get("peak_bytes_in_use"),
      "xla_argument_bytes": analysis.argument_size_in_bytes if analysis else None,
      "xla_temp_bytes": analysis.temp_size_in_bytes if analysis else None,
      "final_loss": float(m["loss"]),
  }
