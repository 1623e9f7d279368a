"""Accelerators by name, for planning before renting them: `tpu-v5p-64`, `8xH100`, `2x8xA100`.

TPU names follow Cloud TPU's accelerator types: v4 and v5p count TensorCores (two per chip,
one JAX device per chip), v5e (`v5litepod`) and v6e count chips. GPU names are
`[NODESx][GPUSx]MODEL`. Memory is the vendor's HBM per JAX device; peak FLOP/s come from
`train/metrics.PEAK_FLOPS` (dense bf16, the MFU denominator).
"""

import dataclasses
import re

from llm_jax.train.metrics import PEAK_FLOPS

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
  raise ValueError(f"no peak FLOP/s for {kind!r} in train/metrics.PEAK_FLOPS")


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
