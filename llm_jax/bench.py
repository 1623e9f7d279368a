"""Train-step benchmark: compile time, step time, tokens/s, MFU and peak memory for a config.

  python -m llm_jax.bench --config=configs/pretrain.py --config.model=... --steps=20

Runs the real sharded train step on synthetic packed batches (random tokens, several documents
per row), writes nothing. Figures are printed, never asserted.
"""

import os
import resource
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from llm_jax import config_check, console, sharding
from llm_jax.model import flops
from llm_jax.model.config import ModelConfig
from llm_jax.train import metrics as metrics_lib, optimizer as opt_lib
from llm_jax.train import state as state_lib, step as step_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/<job>.py file.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after the compile step and one warm-up).")
_DOCS = flags.DEFINE_integer("docs_per_row", 4, "Documents packed per row of the synthetic batch.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Compile, print XLA's buffer sizes, run no "
                                  "step (memory of configs too slow or too big to run here).")


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


def main(argv):
  console.setup()
  del argv
  config = _CONFIG.value
  config_check.validate(config)
  vocab = config.model.vocab_size or config.data.tokenizer.vocab_size
  with config.unlocked():
    config.model.vocab_size = vocab
  model_cfg = ModelConfig.from_config(config.model)
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  tc = config.train
  optimizer, schedule = opt_lib.make_optimizer(tc), opt_lib.make_schedule(tc)
  B, L = config.data.batch_size, config.data.seq_len
  host = synthetic_batch(B // jax.process_count(), L, vocab, _DOCS.value, seed=jax.process_index())

  _, sh = state_lib.state_shardings(model_cfg, optimizer, mesh, rules)  # outside the mesh context
  with step_lib.mesh_context(mesh, rules):
    state = state_lib.create_state(model_cfg, optimizer, jax.random.key(0), sh, mesh, rules)
    step = step_lib.jit_train_step(step_lib.make_train_step(
        model_cfg, optimizer, schedule, grad_accum=tc.grad_accum, z_loss=tc.z_loss), sh, mesh, rules)
    batch = step_lib.to_global(host, mesh, rules)
    t = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    if _COMPILE_ONLY.value:
      print(f"{'compile time':>14}: {compile_s:.2f} s")
      print(f"{'XLA buffers':>14}: {compiled_memory(compiled)}")
      return
    state, m = compiled(state, batch)  # warm-up
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(_STEPS.value):
      state, m = compiled(state, batch)
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t) / _STEPS.value

  counts = flops.param_counts(state["params"])
  fpt = flops.flops_per_token(model_cfg, L)
  peak, source = metrics_lib.peak_flops(model_cfg.dtype)
  tok_s = B * L / step_s
  rows = [
      ("devices", f"{jax.device_count()} x {jax.devices()[0].device_kind}, mesh {dict(mesh.shape)}"),
      ("parameters", f"{counts['total']:,} ({counts['non_embedding']:,} non-embedding)"),
      ("active params", f"{flops.active_param_count(model_cfg, state['params']):,} per token"
                        + (f" ({model_cfg.moe.top_k} of {model_cfg.moe.n_experts} experts)"
                           if model_cfg.moe.enabled else "")),
      ("batch", f"{B} x {L} tokens, grad_accum {tc.grad_accum}, {model_cfg.dtype} compute"),
      ("compile time", f"{compile_s:.2f} s"),
      ("step time", f"{step_s * 1e3:.1f} ms"),
      ("tokens/s", f"{tok_s:,.0f}"),
      ("model TFLOP/s", f"{fpt * tok_s / 1e12:.3f}"),
      ("MFU", f"{100 * fpt * tok_s / peak:.1f}% of {peak / 1e12:.2f} TFLOP/s ({source})"),
      ("peak memory", peak_memory()),
      ("XLA buffers", compiled_memory(compiled)),
      ("final loss", f"{float(m['loss']):.4f}"),
  ]
  if model_cfg.moe.enabled:
    routing = "dropless" if not model_cfg.moe.capacity_factor else f"capacity {model_cfg.moe.capacity_factor}"
    rows.append(("router", f"{routing}, aux {float(m['moe_aux_loss']):.3f}, "
                           f"expert load max/mean {float(m['moe_load_max']):.2f}"))
  for k, v in rows:
    print(f"{k:>14}: {v}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=console.parse_flags)
