"""Train-step benchmark: compile time, step time, tokens/s, MFU and peak memory for a config.

  python -m llm_jax.train.bench --config=configs/pretrain.py --config.model=... --steps=20
  python -m llm_jax.train.bench --shape=minimind-26m --compare_torch
  python -m llm_jax.train.bench --shape=nanogpt-cpu --compare_torch --steps=30
  python -m llm_jax.train.bench --suite=gpu          # the GPU figures (bench_suite.py); --tiny on a CPU

Runs the real sharded train step on synthetic packed batches (random tokens, several documents
per row), writes nothing. Figures are printed, never asserted. Step time is the median of
per-step times. --compare_torch also times the same shape in PyTorch (bench_torch.py) in the
same process, alternating the two sides in --rounds blocks so that a change in the machine's load
hits both, and prints the ratio. Each block starts with one untimed step: the first step after
the other side has run was up to twice as slow on both sides (measured at the 26M shape).
"""

import os

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from llm_jax import config_check, console, devices, sharding, xla_flags
from llm_jax.model import flops
# The timing itself is shared with the GPU suite (bench_suite.py).
from llm_jax.train.measure import compiled_memory, peak_memory, prepare, timed_steps

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
_SUITE = flags.DEFINE_enum("suite", None, ["gpu"], "Run a suite of benchmarks instead (bench_suite.py): "
                           "gpu = smoke, train steps, attention kernels, decoding; prints and writes JSON.")
# Not --out: tests import this module beside data/train_tokenizer.py, whose --out it would clash with.
_OUT = flags.DEFINE_string("suite_dir", "runs/gpu_suite", "--suite: directory of results.json "
                           "(finished parts are kept: the next run resumes) and the smoke test's run.")
_TINY = flags.DEFINE_bool("tiny", False, "--suite: tiny shapes, every part end to end on a CPU in minutes.")
_PARTS = flags.DEFINE_list("parts", [], "--suite: only these parts (smoke, train, attention, decode).")
_FRESH = flags.DEFINE_bool("fresh", False, "--suite: forget earlier results and run every part again.")
_BUDGET_SCALE = flags.DEFINE_float("budget_scale", 1.0, "--suite: multiply every part's time budget.")
_BUDGETS = flags.DEFINE_list("budget", [], "--suite: a part's own budget in seconds, e.g. train=300.")

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


def main():
  if _SUITE.value:
    if _CONFIG.value is not None or _SHAPE.value is not None:
      raise ValueError("--suite runs its own shapes: give no --config or --shape")
    from llm_jax.train import bench_suite  # pylint: disable=g-import-not-at-top
    return bench_suite.run(_SUITE.value, out=_OUT.value, tiny=_TINY.value, parts=_PARTS.value,
                           fresh=_FRESH.value, budget_scale=_BUDGET_SCALE.value,
                           budgets=_BUDGETS.value)
  if (_SHAPE.value is None) == (_CONFIG.value is None):
    raise ValueError("give exactly one of --config and --shape (or --suite=gpu)")
  config = shape_config(_SHAPE.value) if _SHAPE.value else _CONFIG.value
  config_check.validate(config)
  xla_flags.apply_config(config)  # before JAX starts its backend
  torch_step = None
  if _COMPARE_TORCH.value:
    from llm_jax.train import bench_torch  # pylint: disable=g-import-not-at-top
    if (why := bench_torch.unavailable()):
      raise ValueError(f"--compare_torch needs torch and transformers: {why}")
  p = prepare(config, _DOCS.value)
  model_cfg, mesh, compiled, compile_s = p.model_cfg, p.mesh, p.compiled, p.compile_s
  peak, source, tc = p.peak, p.peak_source, config.train
  B, L = config.data.batch_size, config.data.seq_len
  if _COMPILE_ONLY.value:
    print(f"{'compile time':>14}: {compile_s:.2f} s")
    print(f"{'XLA buffers':>14}: {compiled_memory(compiled)}")
    return None
  with sharding.mesh_context(mesh, p.rules):
    state, m = compiled(p.state, p.batch)  # warm-up
    jax.block_until_ready(m)
    if _COMPARE_TORCH.value:
      torch_step = bench_torch.TorchTrainStep(model_cfg, tc, p.host)
      torch_step.step()  # warm-up
    rounds = _ROUNDS.value if torch_step else 1
    per_round = -(-_STEPS.value // rounds)
    times, torch_times = [], []
    for _ in range(rounds):  # alternate, so that load changes hit both sides alike
      if torch_step:  # the first step after the other side ran is slow on both sides: untimed
        state, m, _ = timed_steps(compiled, state, p.batch, 1)
      state, m, t_round = timed_steps(compiled, state, p.batch, per_round)
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
  busy = devices.busy_note()
  if busy:
    print(f"{'note':>14}: {busy}")
  return None



if __name__ == "__main__":
  console.cli(main)
