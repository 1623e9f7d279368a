"""Memory and throughput planner: does a config fit on those devices, and sharded how?

  python -m llm_jax.plan --config=configs/pretrain.py:qwen2-0.5b --devices=8xH100 \
      --config.model.vocab_size=151936 --config.data.seq_len=4096 --config.data.batch_size=64

Prints, per device: parameters and optimizer state (exact: what the trainer allocates, from
`jax.eval_shape` of the real state), gradients and update, logits, and activations for every remat
policy (estimates), for the mesh (data x fsdp x tensor) that fits with the least communication
and recompute, and the overrides that select it. Nothing is allocated; no accelerator is needed.
"""

import dataclasses
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
from absl import app, flags
from ml_collections import config_flags

from llm_jax import config_check, console, devices as devices_lib
from llm_jax.model import flops
from llm_jax.model.config import ModelConfig
from llm_jax.model.kernels import dispatch
from llm_jax.train import memory, optimizer as opt_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/<job>.py file.", lock_config=True)
_DEVICES = flags.DEFINE_string("devices", None, "tpu-v5p-64, v5litepod-16, 8xH100, 2x8xA100, ...")
_USABLE = flags.DEFINE_float("usable", 0.9, "Share of each device's memory a plan may fill (the rest "
                             "is XLA workspace and fragmentation). On GPUs also set "
                             "XLA_PYTHON_CLIENT_MEM_FRACTION to it (JAX preallocates 75%).")
_MFU = flags.DEFINE_float("mfu", 0.4, "MFU assumed for the throughput estimate.")

# Fastest first: each later policy keeps less and recomputes more in the backward pass.
POLICY_ORDER = ("none", "dots", "dots_with_no_batch_dims", "save_attn_out", "full")
GiB = 2**30


@dataclasses.dataclass
class Option:
  mesh: dict  # {"data", "fsdp", "tensor"}
  grad_accum: int
  loss_chunk_len: int
  rows: int  # sequences per device per microbatch
  exact: dict  # {"params", "optimizer"} bytes per device
  estimates: dict  # memory.estimates(...)
  fused_attention: bool

  def total(self, policy: str) -> float:
    e = self.estimates
    return (self.exact["params"] + self.exact["optimizer"] + e["gradients_and_update"] + e["logits"]
            + e["activations"][policy])


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def model_config(config) -> ModelConfig:
  vocab = config.model.vocab_size or config.data.tokenizer.vocab_size
  return ModelConfig.from_config(config.model, vocab_size=vocab)


def uses_fused_attention(cfg: ModelConfig, platform: str, seq_len: int) -> bool:
  impl = {"tpu": "splash", "gpu": "pallas_gpu"}.get(platform)
  if cfg.attention not in ("auto", impl):
    return False
  return not dispatch.blocks(cfg, impl, seq_len)[1]


def options(config, devices: devices_lib.Devices, grad_accum: int, loss_chunk_len: int):
  """Every mesh that lays the state out evenly and splits the batch evenly."""
  cfg = dataclasses.replace(model_config(config), loss_chunk_len=loss_chunk_len)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  optimizer = opt_lib.make_optimizer(config.train)
  batch, seq_len = config.data.batch_size, config.data.seq_len
  fused = uses_fused_attention(cfg, devices.platform, seq_len)
  out = []
  for tensor in _divisors(devices.per_host):
    if devices.count % tensor:
      continue
    for fsdp in _divisors(devices.count // tensor):
      data = devices.count // tensor // fsdp
      if batch % (data * fsdp * grad_accum):
        continue
      mesh = {"data": data, "fsdp": fsdp, "tensor": tensor}
      try:
        exact = memory.state_bytes(cfg, optimizer, mesh, rules)
      except memory.Indivisible:
        continue
      rows = batch // (data * fsdp) // grad_accum
      layout = memory.Layout(rows=rows, seq_len=seq_len, tensor=tensor)
      out.append(Option(mesh, grad_accum, loss_chunk_len, rows, exact,
                        memory.estimates(cfg, layout, exact["params"], fused, grad_accum), fused))
  return out


def _chunk_for(config, devices, rows_hint: int) -> int:
  """A loss chunk whose logits take at most 1/16 of a device: the largest power of two from
  2048 down to 128 (and at most seq_len) that keeps [rows, chunk, V] under that."""
  vocab = model_config(config).vocab_size
  for chunk in (2048, 1024, 512, 256, 128):
    if chunk <= config.data.seq_len and rows_hint * chunk * vocab * 10 <= devices.hbm_bytes / 16:
      return chunk
  return min(128, config.data.seq_len)


def plan(config, devices: devices_lib.Devices, usable: float = 0.9):
  """(best Option, its remat policy, every Option tried). The best: the least tensor
  parallelism, then the fastest remat policy, then the config's own loss (else a chunked one:
  same FLOPs, no [B, L, V] logits), then the least FSDP, that fits `usable` of the memory; with
  more gradient accumulation only if nothing fits without. (None, None, tried) if none fits."""
  budget = usable * devices.hbm_bytes
  user_chunk = config.model.loss_chunk_len
  accums = [a for a in (1, 2, 4, 8, 16, 32, 64) if a >= config.train.grad_accum]
  tried = []
  for accum in accums:
    opts = options(config, devices, accum, user_chunk)
    if not user_chunk and opts:
      rows = min(o.rows for o in opts)
      opts += options(config, devices, accum, _chunk_for(config, devices, rows))
    tried += opts
    for tensor in sorted({o.mesh["tensor"] for o in opts}):
      for policy in POLICY_ORDER:
        fitting = [o for o in opts if o.mesh["tensor"] == tensor and o.total(policy) <= budget]
        if fitting:
          # The config's own loss setting first, then the least FSDP.
          return min(fitting, key=lambda o: (o.loss_chunk_len != user_chunk, o.mesh["fsdp"])), policy, tried
  return None, None, tried


def _gib(b: float) -> str:
  return f"{b / GiB:8.2f}"


def main(argv):
  console.setup()
  del argv
  config = _CONFIG.value
  try:  # user errors: one line naming the flag or field, no traceback
    config_check.validate(config)
    devices = devices_lib.parse(_DEVICES.value)
    cfg = model_config(config)
  except ValueError as e:
    sys.stderr.write(f"error: {e}\n")
    return 2
  budget = _USABLE.value * devices.hbm_bytes
  shapes, _ = memory.abstract_params(cfg, tuple(tuple(r) for r in config.sharding_rules))
  n_params = sum(x.size for x in jax.tree.leaves(shapes))
  B, L = config.data.batch_size, config.data.seq_len
  print(f"model      {n_params:,} parameters ({cfg.param_dtype} params and optimizer, "
        f"{cfg.dtype} compute), vocab {cfg.vocab_size:,}")
  print(f"devices    {devices.count} x {devices.kind} ({devices.hbm_bytes / GiB:.1f} GiB each, "
        f"{devices.hosts} host{'s' if devices.hosts > 1 else ''}); plan within {_USABLE.value:.0%}: "
        f"{budget / GiB:.1f} GiB")
  print(f"batch      {B} x {L} tokens per step, grad_accum {config.train.grad_accum}")
  best, policy, tried = plan(config, devices, _USABLE.value)
  if best is None:
    o = min(tried, key=lambda o: o.total("full")) if tried else None
    need = f" (the smallest needs {o.total('full') / GiB:.1f} GiB per device)" if o else ""
    print(f"\nNOTHING FITS{need}: use more or larger devices, a smaller batch or seq_len.")
    return 1
  attention = "fused kernel" if best.fused_attention else "XLA ([L, L] scores)"
  print(f"\nmesh       data={best.mesh['data']} fsdp={best.mesh['fsdp']} tensor={best.mesh['tensor']}: "
        f"{best.rows} sequence(s) per device per microbatch, attention: {attention}")
  e = best.estimates
  rows = [("parameters (exact)", best.exact["params"]), ("optimizer state (exact)", best.exact["optimizer"]),
          ("gradients + update (estimate)", e["gradients_and_update"]),
          (f"logits (estimate{', chunks of %d' % best.loss_chunk_len if best.loss_chunk_len else ''})",
           e["logits"])]
  print(f"\n{'per device':40s} {'GiB':>8s}")
  for name, b in rows:
    print(f"  {name:38s} {_gib(b)}")
  print("  activations by remat policy (estimates)   total")
  for p in POLICY_ORDER:
    mark = "  <- fastest that fits" if p == policy else ("  fits" if best.total(p) <= budget else "")
    print(f"    {p:36s} {_gib(e['activations'][p])} {_gib(best.total(p))}{mark}")
  overrides = [f"--config.mesh.data={best.mesh['data']}", f"--config.mesh.fsdp={best.mesh['fsdp']}",
               f"--config.mesh.tensor={best.mesh['tensor']}", f"--config.model.remat_policy={policy}"]
  if best.loss_chunk_len != config.model.loss_chunk_len:
    overrides.append(f"--config.model.loss_chunk_len={best.loss_chunk_len}")
  if best.grad_accum != config.train.grad_accum:
    overrides.append(f"--config.train.grad_accum={best.grad_accum}")
  print("\nrun with   " + " ".join(overrides))
  tok_s = _MFU.value * devices.peak_flops * devices.count / flops.flops_per_token(cfg, L)
  print(f"throughput {tok_s:,.0f} tokens/s, {B * L / tok_s:.2f} s/step at {_MFU.value:.0%} MFU "
        f"(an assumption, not a measurement; {devices.peak_flops / 1e12:.0f} TFLOP/s bf16 peak each)")
  return 0


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "devices"])
  app.run(main, flags_parser=console.parse_flags)
