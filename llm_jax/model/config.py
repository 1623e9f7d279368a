"""The decoder's hyper-parameters as a frozen dataclass (hashable, so usable as a jit static)."""

import dataclasses
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "save_attn_out")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10000.0
  rms_eps: float = 1e-6
  qkv_bias: bool = False
  qk_norm: bool = False
  tie_embeddings: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  attention: str = "xla"
  init_std: float = 0.02
  # A model/lora.LoraConfig: adapters on the chosen projections (None: no LoRA). Not read from
  # config.model; set by lora.with_lora from config.lora.
  lora: Any = None

  @property
  def compute_dtype(self) -> Any:
    return _DTYPES[self.dtype]

  @property
  def weight_dtype(self) -> Any:
    return _DTYPES[self.param_dtype]

  def validate(self) -> "ModelConfig":
    def bad(field, why):
      raise ValueError(f"config.model.{field}={getattr(self, field)!r}: {why}")
    for f in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim"):
      if getattr(self, f) <= 0:
        bad(f, "must be a positive integer")
    if self.n_heads % self.n_kv_heads:
      bad("n_kv_heads", f"must divide n_heads={self.n_heads} (grouped-query attention)")
    for f in ("dtype", "param_dtype"):
      if getattr(self, f) not in _DTYPES:
        bad(f, f"must be one of {sorted(_DTYPES)}")
    if self.remat_policy not in REMAT_POLICIES:
      bad("remat_policy", f"must be one of {REMAT_POLICIES}")
    if self.attention not in ("xla", "cudnn"):
      bad("attention", "must be 'xla' or 'cudnn'")
    if self.attention == "cudnn":
      # cuDNN's fused attention kernels take half-precision inputs and head sizes <= 128, multiple of 8.
      if self.dtype not in ("bfloat16", "float16"):
        bad("dtype", "attention='cudnn' needs dtype='bfloat16' (or float16); use attention='xla' for float32")
      if self.head_dim > 128 or self.head_dim % 8:
        bad("head_dim", "attention='cudnn' needs head_dim <= 128 and a multiple of 8; use attention='xla'")
    return self

  @classmethod
  def from_config(cls, cfg, vocab_size: int | None = None) -> "ModelConfig":
    """Builds from the `config.model` ConfigDict; `head_dim=0` means dim // n_heads."""
    d = {f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name in cfg}
    if vocab_size is not None and not d.get("vocab_size"):
      d["vocab_size"] = vocab_size
    if not d.get("head_dim"):
      d["head_dim"] = d["dim"] // d["n_heads"]
    return cls(**d).validate()
