"""The planner's search: every mesh (data x fsdp x tensor) a config can be laid out on, and the
one that fits with the least communication and recompute. `python -m llm_jax.plan` prints it."""

import dataclasses

from llm_jax import devices as devices_lib
from llm_jax.model.config import ModelConfig
from llm_jax.model.kernels import dispatch
from llm_jax.plan import memory
from llm_jax.train import optimizer as opt_lib

# Fastest first: each later policy keeps less and recomputes more in the backward pass.
POLICY_ORDER = ("none", "dots", "dots_with_no_batch_dims", "save_attn_out", "full")


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
