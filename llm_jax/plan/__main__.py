"""Memory and throughput planner: does a config fit on those devices, and sharded how?

  python -m llm_jax.plan --config=configs/pretrain.py:qwen2-0.5b --devices=8xH100 \
      --config.model.vocab_size=151936 --config.data.seq_len=4096 --config.data.batch_size=64

Prints, per device: parameters and optimizer state (exact: what the trainer allocates, from
`jax.eval_shape` of the real state), gradients and update, logits, and activations for every remat
policy (estimates), for the mesh (data x fsdp x tensor) that fits with the least communication
and recompute, and the overrides that select it. Nothing is allocated; no accelerator is needed.
"""



import jax
from absl import flags
from ml_collections import config_flags

from llm_jax import config_check, console, devices as devices_lib
from llm_jax.model import flops, init as model_init
from llm_jax.plan.search import model_config, plan, POLICY_ORDER

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/<job>.py file.", lock_config=True)
_DEVICES = flags.DEFINE_string("devices", None, "tpu-v5p-64, v5litepod-16, 8xH100, 2x8xA100, ...")
_USABLE = flags.DEFINE_float("usable", 0.9, "Share of each device's memory a plan may fill (the rest "
                             "is XLA workspace and fragmentation). On GPUs also set "
                             "XLA_PYTHON_CLIENT_MEM_FRACTION to it (JAX preallocates 75%).")
_MFU = flags.DEFINE_float("mfu", 0.4, "MFU assumed for the throughput estimate.")

GiB = 2**30


def _gib(b: float) -> str:
  return f"{b / GiB:8.2f}"


def main():
  config = _CONFIG.value
  config_check.validate(config)
  devices = devices_lib.parse(_DEVICES.value)
  cfg = model_config(config)
  budget = _USABLE.value * devices.hbm_bytes
  shapes, _ = model_init.mesh_specs(cfg, tuple(tuple(r) for r in config.sharding_rules))
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
  print(f"throughput {tok_s:,.0f} tokens/s, {B * L / tok_s:.3g} s/step at {_MFU.value:.0%} MFU "
        f"(an assumption, not a measurement; {devices.peak_flops / 1e12:.0f} TFLOP/s bf16 peak each)")
  return 0


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "devices"])
  console.cli(main)
