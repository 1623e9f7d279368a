"""Train-step benchmark: compile time, step time, tokens/s, MFU and peak memory for a config.

  python -m llm_jax.train.bench --config=configs/pretrain.py --config.model=... --steps=20
  python -m llm_jax.train.bench --shape=minimind-26m --compare_torch
  python -m llm_jax.train.bench --shape=nanogpt-cpu --compare_torch --steps=30

Runs the real sharded train step on synthetic packed batches (random tokens, several documents
per row), writes nothing. Figures are printed, never asserted. Step time is the median of
per-step times. --compare_torch also times the same shape in PyTorch (bench_torch.py) in the
same process, alternating the two sides in --rounds blocks so that a change in the machine's load
hits both, and prints the ratio. Each block starts with one untimed step: the first step after
the other side has run was up to twice as slow on both sides (measured at the 26M shape).
"""

import os
import resource
import time


import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from llm_jax import config_check, console, devices, sharding
from llm_jax.model import flops
from llm_jax.model.config import ModelConfig
from llm_jax.train import optimizer as opt_lib, state as state_lib, step as step_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/<job>.py file.", lock_config=True)
_SHAPE = flags.DEFINE_enum("shape", None, ["minimind-26m", "nanogpt-cpu"],
                           "A named shape (model, vocabulary, batch, sequence length) instead of --config.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per side (after the compile step and one warm-up).")
_DOCS = flags.DEFINE_integer("docs_per_row", 4, "Documents packed per row of the synthetic batch.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Compile, print XLA's buffer sizes, run no "
                                  "step (memory of configs too slow or too big to run here).")
_COMPARE_TORCH = flags.DEFINE_bool("compare_torch", False, "Also time the same step in PyTorch "
                                   "(transformers, float32) and print the ratio.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "With --compare_torch: alternate the two sides this many times.")

# The shapes of the PyTorch projects our users come from: minimind's 26M model (its pretraining
# batch per step on a CPU) and nanoGPT's Shakespeare-char CPU config (a Llama block of its size).
SHAPES = {
    "minimind-26m": dict(preset="minimind-26m", model={}, vocab_size=6400, seq_len=512, batch_size=8),
    "nanogpt-cpu": dict(preset="tiny", model=dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=4,
                                                  mlp_dim=512, tie_embeddings=True),
                        vocab_size=65, seq_len=64, batch_size=12),
}


def shape_config(name: str):
  """configs/pretrain.py with the named shape (see SHAPES)."""
  from configs import pretrain  # pylint: disable=g-import-not-at-top
  shape = SHAPES[name]
  config = pretrain.get_config(shape["preset"])
  config.model.update(shape["model"])
  config.model.vocab_size = shape["vocab_size"]
  config.data.seq_len, config.data.batch_size = shape["seq_len"], shape["batch_size"]
  return config


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


def main():
  if (_SHAPE.value is None) == (_CONFIG.value is None):
    raise ValueError("give exactly one of --config and --shape")
  config = shape_config(_SHAPE.value) if _SHAPE.value else _CONFIG.value
  config_check.validate(config)
  torch_step = None
  if _COMPARE_TORCH.value:
    from llm_jax.train import bench_torch  # pylint: disable=g-import-not-at-top
    if (why := bench_torch.unavailable()):
      raise ValueError(f"--compare_torch needs torch and transformers: {why}")
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
  host = synthetic_batch(B // jax.process_count(), L, vocab, _DOCS.value, seed=jax.process_index())

  _, sh = state_lib.state_shardings(model_cfg, optimizer, mesh, rules)  # outside the mesh context
  with sharding.mesh_context(mesh, rules):
    state = state_lib.create_state(model_cfg, optimizer, jax.random.key(0), sh, mesh, rules)
    step = step_lib.jit_train_step(step_lib.make_train_step(
        model_cfg, optimizer, schedule, grad_accum=tc.grad_accum, z_loss=tc.z_loss), sh, mesh, rules)
    batch = sharding.to_global(host, mesh, rules)
    t = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    if _COMPILE_ONLY.value:
      print(f"{'compile time':>14}: {compile_s:.2f} s")
      print(f"{'XLA buffers':>14}: {compiled_memory(compiled)}")
      return
    state, m = compiled(state, batch)  # warm-up
    jax.block_until_ready(m)
    if _COMPARE_TORCH.value:
      torch_step = bench_torch.TorchTrainStep(model_cfg, tc, host)
      torch_step.step()  # warm-up
    rounds = _ROUNDS.value if torch_step else 1
    per_round = -(-_STEPS.value // rounds)
    times, torch_times = [], []
    for _ in range(rounds):  # alternate, so that load changes hit both sides alike
      if torch_step:  # the first step after the other side ran is slow on both sides: untimed
        state, m, _ = timed_steps(compiled, state, batch, 1)
      state, m, t_round = timed_steps(compiled, state, batch, per_round)
      times += t_round
      if torch_step:
        torch_step.step()
        torch_times += torch_step.timed(per_round)
    step_s = float(np.median(times))

  counts = flops.param_counts(state["params"])
  fpt = flops.flops_per_token(model_cfg, L)
  tok_s = B * L / step_s
  rows = [
      ("devices", f"{jax.device_count()} x {jax.devices()[0].device_kind}, mesh {dict(mesh.shape)}"),
      ("parameters", f"{counts['total']:,} ({counts['non_embedding']:,} non-embedding)"),
      ("active params", f"{flops.active_param_count(model_cfg, state['params']):,} per token"
                        + (f" ({model_cfg.moe.top_k} of {model_cfg.moe.n_experts} experts)"
                           if model_cfg.moe.enabled else "")),
      ("batch", f"{B} x {L} tokens, grad_accum {tc.grad_accum}, {model_cfg.dtype} compute"),
      ("compile time", f"{compile_s:.2f} s"),
      ("step time", f"{step_s * 1e3:.1f} ms (median of {len(times)}, min {min(times) * 1e3:.1f})"),
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
  if torch_step:
    torch_s = float(np.median(torch_times))
    rows += [
        ("PyTorch step", f"{torch_s * 1e3:.1f} ms (median of {len(torch_times)}, min "
                         f"{min(torch_times) * 1e3:.1f}; transformers float32, {torch_step.threads()} threads)"),
        ("PyTorch tok/s", f"{B * L / torch_s:,.0f}"),
        ("ratio", f"{torch_s / step_s:.2f}x PyTorch's speed (PyTorch step time / llm_jax step time)"),
        ("load average", " ".join(f"{x:.2f}" for x in os.getloadavg())),
    ]
  for k, v in rows:
    print(f"{k:>14}: {v}")


if __name__ == "__main__":
  console.cli(main)
