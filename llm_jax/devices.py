"""The hardware catalogue: accelerators by name for planning before renting them (`tpu-v5p-64`,
`8xH100`, `2x8xA100`), and the peak FLOP/s that MFU divides by (`peak_flops`), for these and for
the CPU this process runs on (measured once per machine, then kept).

TPU names follow Cloud TPU's accelerator types: v4 and v5p count TensorCores (two per chip,
one JAX device per chip), v5e (`v5litepod`) and v6e count chips. GPU names are
`[NODESx][GPUSx]MODEL`. Memory is the vendor's HBM per JAX device; peak FLOP/s are dense bf16
spec-sheet figures (`PEAK_FLOPS`).
"""

import dataclasses
import functools
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import paths

# Dense bf16 peak FLOP/s per chip, matched as substrings of `device.device_kind`.
PEAK_FLOPS = (
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v3", 123e12), ("TPU v2", 45e12),
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12), ("B200", 2250e12),
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


def load_average() -> float | None:
  """The 1-minute load average (runnable processes, all users), or None where there is none."""
  try:
    return os.getloadavg()[0]
  except (AttributeError, OSError):  # not Unix
    return None


def busy_note() -> str | None:
  """A line for logs beside speed figures when the machine is busy (its load average above the
  cores this process may use): other work then takes turns on the cores, so tokens/s, s/step
  and MFU measured now read low and vary from run to run. None on a quiet machine."""
  load, cores = load_average(), _cpu_count()
  if load is None or load <= cores:
    return None
  return (f"this machine is busy (load average {load:.1f} on {cores} cores): speed figures "
          "(tokens/s, s/step, MFU) measured now are not representative of it")


def _matmul_peak(dtype_name: str, n: int, repeats: int) -> float:
  """FLOP/s of an n x n matmul in `dtype_name` on all the cores this process may use (see
  `_measured_cpu_peak` for why CPU time and the fastest of `repeats`)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, n)), dtype_name)  # not ones: no shortcut for constants
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  per_cpu_s = []
  for _ in range(repeats):
    t = time.process_time()
    f(x).block_until_ready()
    per_cpu_s.append(time.process_time() - t)
  return 2 * n ** 3 / max(min(per_cpu_s), 1e-9) * _cpu_count()


# A kept peak is measured again when the load now is this much below the lowest load any earlier
# measurement was taken at (load averages wander by a few tenths on an idle machine).
_REMEASURE_LOAD_DROP = 0.5


def _read_peak_cache(path: str) -> dict:
  try:
    with open(path) as f:
      cached = json.load(f)
  except (OSError, ValueError):  # none yet, or unreadable: measure
    cached = {}
  return cached if isinstance(cached, dict) else {}


def _kept_record(value) -> dict | None:
  """A cache entry as {"flops", "load", "tried_load", "measured"}; a bare number (the format
  before loads were kept) is a peak of unknown load, so it is measured once more."""
  if isinstance(value, (int, float)) and value > 0:
    return {"flops": float(value), "load": None, "tried_load": None, "measured": None}
  if isinstance(value, dict) and isinstance(value.get("flops"), (int, float)) and value["flops"] > 0:
    return value
  return None


@functools.lru_cache(maxsize=None)
def _measured_cpu_peak_record(dtype_name: str, n: int = 2048, repeats: int = 5) -> dict:
  """The CPU's peak FLOP/s for `dtype_name` as kept in `cpu_peak_cache_path()`:
  {"flops", "load" (the load average when that figure was measured), "tried_load" (the lowest
  load any measurement ran at), "measured" (its date)}.

  Timed by the process's CPU time, not the wall clock: FLOPs per CPU-second is what one core
  delivers, times the cores gives the machine's peak. On a quiet machine this equals the
  wall-clock rate; on a busy one (other jobs, data workers) the wall clock reads several times
  low while CPU time barely moves, so MFU stays comparable between runs. The fastest of
  `repeats` runs: disturbances (another process, threads spinning) only ever slow a run.
  2048, not 1024: a 1024 matmul (8 ms here) is short enough for thread start-up and scheduling
  to show, and its fastest of 15 read 0.26-0.38 TFLOP/s between processes on a quiet 2-core
  machine; the fastest of 5 at 2048 (60 ms each) read 0.277-0.292, quiet or with a busy core
  beside it. It takes about 0.7 s, so the figure is kept per CPU model, core count, jax version
  and dtype, and not measured per run. CPU time still reads low under heavy load (a peak taken
  while this machine was busy, 0.257 TFLOP/s, stayed kept for every later run), so the kept figure is the highest seen:
  a process that starts while the machine is quieter than at every earlier measurement
  (`_REMEASURE_LOAD_DROP` below the lowest load tried) measures again, and a higher figure
  replaces the kept one.
  """
  key = f"{_cpu_model()} | {_cpu_count()} cores | jax {jax.__version__} | {dtype_name} | {n}"
  path = cpu_peak_cache_path()
  cached = _read_peak_cache(path)
  kept = _kept_record(cached.get(key))
  load = load_average()
  tried = None if kept is None else kept.get("tried_load")
  if kept is not None and tried is not None and (load is None or load > tried - _REMEASURE_LOAD_DROP):
    return kept
  peak = _matmul_peak(dtype_name, n, repeats)
  lowest = min((v for v in (tried, load) if v is not None), default=None)
  if kept is None or peak > kept["flops"]:
    record = {"flops": peak, "load": load, "tried_load": lowest,
              "measured": time.strftime("%Y-%m-%d %H:%M")}
  else:
    record = {**kept, "tried_load": lowest}
  cached = _read_peak_cache(path)  # another process may have written meanwhile: keep its entries
  other = _kept_record(cached.get(key))
  if other is not None and other["flops"] > record["flops"]:
    record = {**other, "tried_load": min((v for v in (other.get("tried_load"), lowest)
                                          if v is not None), default=None)}
  try:  # best effort, atomic: a concurrent run keeps either file whole
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      json.dump({**cached, key: record}, f, indent=1)
    os.replace(tmp, path)
  except OSError:
    pass
  return record


def _measured_cpu_peak(dtype_name: str, n: int = 2048, repeats: int = 5) -> float:
  return float(_measured_cpu_peak_record(dtype_name, n, repeats)["flops"])


def peak_flops(compute_dtype: str = "float32") -> tuple[float, str]:
  """(peak FLOP/s of all devices of this job, where the figure came from)."""
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    # Virtual CPU devices share the same cores, so the host's peak is the whole budget.
    record = _measured_cpu_peak_record(compute_dtype)
    load = record.get("load")
    at = f" at load average {load:.1f}" if isinstance(load, (int, float)) else ""
    when = f" on {record['measured']}" if record.get("measured") else ""
    return (float(record["flops"]),
            f"measured {compute_dtype} matmul on this CPU's {_cpu_count()} cores, by CPU time"
            f"{at}{when}; the highest seen is kept in {cpu_peak_cache_path()}")
  for key, flops in PEAK_FLOPS:
    if key.lower() in dev.device_kind.lower():
      return flops * jax.device_count(), f"{dev.device_kind} bf16 spec x {jax.device_count()}"
  return float("nan"), f"unknown device {dev.device_kind!r}: add it to PEAK_FLOPS"

GB = 1e9

# accelerator-type prefix -> (device_kind, HBM per JAX device, TensorCores per JAX device,
# JAX devices per host in multi-host slices, largest single-host slice in JAX devices)
TPUS = {
    "v4": ("TPU v4", 32 * 2**30, 2, 4, 4),
    "v5p": ("TPU v5p", 95 * GB, 2, 4, 4),
    "v5e": ("TPU v5 lite", 16 * GB, 1, 4, 8),
    "v5litepod": ("TPU v5 lite", 16 * GB, 1, 4, 8),
    "v6e": ("TPU v6 lite", 32 * GB, 1, 4, 8),
}
# model -> (device_kind as JAX names it, HBM bytes); GPUs sit 8 to a node unless said otherwise
GPUS = {
    "H100": ("NVIDIA H100 80GB HBM3", 80 * GB), "H200": ("NVIDIA H200", 141 * GB),
    "H800": ("NVIDIA H800", 80 * GB), "B200": ("NVIDIA B200", 180 * GB),
    "A100": ("NVIDIA A100-SXM4-80GB", 80 * GB), "A100-40GB": ("NVIDIA A100-SXM4-40GB", 40 * GB),
    "L40S": ("NVIDIA L40S", 48 * GB), "L4": ("NVIDIA L4", 24 * GB), "A10": ("NVIDIA A10", 24 * GB),
    "RTX4090": ("NVIDIA GeForce RTX 4090", 24 * GB), "V100": ("Tesla V100-SXM2-32GB", 32 * GB),
    "T4": ("Tesla T4", 16 * GB),
}


@dataclasses.dataclass(frozen=True)
class Devices:
  spec: str  # what the user typed
  kind: str  # device_kind, as jax.devices()[0].device_kind would say
  platform: str  # tpu | gpu
  count: int  # JAX devices in the job
  per_host: int  # JAX devices per host: tensor parallelism stays inside one host
  hbm_bytes: float  # memory per device
  peak_flops: float  # dense bf16 FLOP/s per device

  @property
  def hosts(self) -> int:
    return max(1, self.count // self.per_host)


def _peak(kind: str) -> float:
  for key, flops in PEAK_FLOPS:
    if key.lower() in kind.lower():
      return flops
  raise ValueError(f"no peak FLOP/s for {kind!r} in devices.PEAK_FLOPS")


def parse(spec: str) -> Devices:
  """`tpu-v5p-64` | `v5litepod-16` | `8xH100` | `2x8xH100` | `H100` -> Devices."""
  s = spec.strip()
  m = re.fullmatch(r"(?:tpu-)?(v4|v5p|v5e|v5litepod|v6e)-(\d+)", s, re.IGNORECASE)
  if m:
    kind, hbm, cores, per_host, single_host = TPUS[m.group(1).lower()]
    n = int(m.group(2))
    if n % cores:
      raise ValueError(f"--devices={spec}: a {m.group(1)} slice counts TensorCores, "
                       f"{cores} per chip; use a multiple of {cores}")
    count = n // cores
    # Per-chip peak: TPU v4/v5p spec sheets quote it per chip (= one JAX device here).
    return Devices(spec, kind, "tpu", count, count if count <= single_host else per_host, hbm,
                   _peak(kind))
  m = re.fullmatch(r"(?:(\d+)x)?(?:(\d+)x)?([A-Za-z0-9-]+)", s)
  if m and m.group(3).upper() in {k.upper() for k in GPUS}:
    model = next(k for k in GPUS if k.upper() == m.group(3).upper())
    kind, hbm = GPUS[model]
    nodes, per_node = (int(m.group(1)), int(m.group(2))) if m.group(2) else (1, int(m.group(1) or 1))
    return Devices(spec, kind, "gpu", nodes * per_node, per_node, hbm, _peak(kind))
  raise ValueError(f"--devices={spec!r}: unknown; use a TPU type (tpu-v4-32, tpu-v5p-64, "
                   f"v5litepod-16, v6e-8) or [NODESx]GPUSxMODEL with MODEL in {sorted(GPUS)} "
                   "(8xH100, 2x8xA100)")
