"""What a user reads while training: throughput, MFU and the console line (writers.py sends them).

MFU = model FLOPs per second / peak FLOPs of the devices in use. Peaks are dense bf16 figures
from vendor spec sheets; on CPU (no spec sheet) the peak is measured once per machine with a
matmul in the model's compute dtype, so MFU there reads as "share of what this CPU's XLA matmul
reaches" (see `_measured_cpu_peak` for why it is robust to a busy machine, and where it is kept).
"""

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import paths

# Dense bf16 peak FLOP/s per chip, matched as substrings of `device.device_kind`.
PEAK_FLOPS = (
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v3", 123e12), ("TPU v2", 45e12),
    ("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12),
)


def _cpu_count() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def cpu_peak_cache_path() -> str:
  """Where measured CPU peaks are kept between processes (delete it to measure again)."""
  return paths.cache_dir("cpu_peak.json")


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
  except OSError:  # not Linux
    return ""


@functools.lru_cache(maxsize=None)
def _measured_cpu_peak(dtype_name: str, n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of an n x n matmul in `dtype_name` on all the cores this process may use.

  Timed by the process's CPU time, not the wall clock: FLOPs per CPU-second is what one core
  delivers, times the cores gives the machine's peak. On a quiet machine this equals the
  wall-clock rate; on a busy one (other jobs, data workers) the wall clock reads several times
  low while CPU time barely moves, so MFU stays comparable between runs. The fastest of
  `repeats` runs: disturbances (another process, threads spinning) only ever slow a run.
  2048, not 1024: a 1024 matmul (8 ms here) is short enough for thread start-up and scheduling
  to show, and its fastest of 15 read 0.26-0.38 TFLOP/s between processes on a quiet 2-core
  machine; the fastest of 5 at 2048 (60 ms each) read 0.277-0.292, quiet or with a busy core
  beside it. It takes about 0.7 s, so the figure is kept in `cpu_peak_cache_path()` per CPU
  model, core count, jax version and dtype, and measured once per machine, not per run.
  """
  key = f"{_cpu_model()} | {_cpu_count()} cores | jax {jax.__version__} | {dtype_name} | {n}"
  path = cpu_peak_cache_path()
  try:
    with open(path) as f:
      cached = json.load(f)
  except (OSError, ValueError):  # none yet, or unreadable: measure
    cached = {}
  cached = cached if isinstance(cached, dict) else {}
  if isinstance(cached.get(key), (int, float)) and cached[key] > 0:
    return float(cached[key])
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, n)), dtype_name)  # not ones: no shortcut for constants
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  per_cpu_s = []
  for _ in range(repeats):
    t = time.process_time()
    f(x).block_until_ready()
    per_cpu_s.append(time.process_time() - t)
  peak = 2 * n ** 3 / max(min(per_cpu_s), 1e-9) * _cpu_count()
  try:  # best effort, atomic: a concurrent run keeps either file whole
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      json.dump({**cached, key: peak}, f, indent=1)
    os.replace(tmp, path)
  except OSError:
    pass
  return peak


def peak_flops(compute_dtype: str = "float32") -> tuple[float, str]:
  """(peak FLOP/s of all devices of this job, where the figure came from)."""
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    # Virtual CPU devices share the same cores, so the host's peak is the whole budget.
    return (_measured_cpu_peak(compute_dtype),
            f"measured {compute_dtype} matmul on this CPU's {_cpu_count()} cores, by CPU time; "
            f"kept in {cpu_peak_cache_path()}")
  for key, flops in PEAK_FLOPS:
    if key.lower() in dev.device_kind.lower():
      return flops * jax.device_count(), f"{dev.device_kind} bf16 spec x {jax.device_count()}"
  return float("nan"), f"unknown device {dev.device_kind!r}: add it to PEAK_FLOPS"


class Throughput:
  """Tokens/s and MFU over the steps since the last report."""

  def __init__(self, tokens_per_step: int, flops_per_token: float, compute_dtype: str):
    self.tokens_per_step = tokens_per_step
    self.flops_per_step = flops_per_token * tokens_per_step
    self.peak, self.peak_source = peak_flops(compute_dtype)
    self._t = time.perf_counter()
    self._step = None

  def start(self, step: int):
    self._t, self._step = time.perf_counter(), step

  def report(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps = step - self._step
    dt = (now - self._t) / max(steps, 1)
    self._t, self._step = now, step
    return {
        "step_time_s": dt,
        "tokens_per_s": self.tokens_per_step / dt,
        "mfu": self.flops_per_step / dt / self.peak,
    }


_FORMATS = {"loss": "loss {:.4f}", "accuracy": "accuracy {:.3f}",
            # DPO (TRL's names) and distillation
            "rewards/accuracies": "rewards/accuracies {:.3f}",
            "rewards/margins": "rewards/margins {:.4f}", "rewards/chosen": "rewards/chosen {:.4f}",
            "rewards/rejected": "rewards/rejected {:.4f}", "logps/chosen": "logps/chosen {:.2f}",
            "logps/rejected": "logps/rejected {:.2f}", "ce": "ce {:.4f}", "kl": "kl {:.4f}",
            "learning_rate": "lr {:.3g}",
            "grad_norm": "grad_norm {:.3f}", "tokens_per_s": "{:,.0f} tokens/s",
            "mfu": "MFU {:.1%}", "step_time_s": "{:.3f} s/step", "padding_share": "padding {:.1%}",
            "moe_aux_loss": "moe aux {:.3f}", "moe_load_max": "expert load max/mean {:.2f}",
            "moe_dropped_share": "dropped {:.1%}"}


def format_line(step: int, total: int, scalars: dict[str, float]) -> str:
  parts = [f"step {step}/{total}"]
  parts += [fmt.format(scalars[k]) for k, fmt in _FORMATS.items() if k in scalars]
  return " | ".join(parts)


def format_eval_line(step: int, scalars: dict[str, float]) -> str:
  """"eval at step N: loss ... | ..." for any objective's eval metrics (keys "eval_<name>")."""
  plain = {k[len("eval_"):]: v for k, v in scalars.items() if k.startswith("eval_")}
  parts = [fmt.format(plain[k]) for k, fmt in _FORMATS.items() if k in plain]
  if "perplexity" in plain:
    parts.append(f"perplexity {plain['perplexity']:.2f}")
  count = next(((k, plain[k]) for k in ("pairs", "trained_tokens") if k in plain), None)
  tail = f" ({count[1]:,.0f} {count[0].replace('trained_', '')})" if count else ""
  return f"eval at step {step}: " + " | ".join(parts) + tail


def to_host(metrics) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


def flat_hparams(config) -> dict:
  """config as {"train.lr": 3e-3, ...} with the scalar fields TensorBoard's HParams tab shows."""
  out = {}

  def walk(prefix, d):
    for k, v in d.items():
      if hasattr(v, "items"):
        walk(f"{prefix}{k}.", v)
      elif isinstance(v, (bool, int, float, str)):
        out[f"{prefix}{k}"] = v
  walk("", config)
  return out
