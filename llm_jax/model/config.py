"""The decoder's hyper-parameters as a frozen dataclass (hashable, so usable as a jit static)."""

import dataclasses
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "save_attn_out")
# xla: plain jnp (any device); cudnn: jax.nn.dot_product_attention with a dense segment mask (GPU);
# splash: Pallas TPU splash attention; pallas_gpu: Pallas (Triton) flash attention for GPUs;
# auto: splash on TPU, pallas_gpu on GPU, xla elsewhere (see llm_jax/model/kernels/).
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash", "pallas_gpu")


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
  # Fused-kernel tile sizes (splash, pallas_gpu); 0 takes the kernel's default for the platform.
  attention_block_q: int = 0
  attention_block_kv: int = 0
  attention_block_q_bwd: int = 0
  attention_block_kv_bwd: int = 0
  attention_interpret: bool = False  # run the Pallas kernels in interpret mode (CPU tests, debugging)
  loss_chunk_len: int = 0  # > 0: cross-entropy over this many positions at a time (no [B, L, V] logits)
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
    if self.attention not in ATTENTION_IMPLS:
      bad("attention", f"must be one of {ATTENTION_IMPLS}")
    for f in ("attention_block_q", "attention_block_kv", "attention_block_q_bwd",
              "attention_block_kv_bwd"):
      b = getattr(self, f)
      if b < 0:
        bad(f, "must be >= 0 (0 takes the kernel's default)")
      if b and self.attention == "splash" and b % 128:
        bad(f, "splash attention tiles are multiples of 128 (TPU lanes); use 128, 256, 512, ...")
      if b and self.attention == "pallas_gpu" and (b < 16 or b & (b - 1)):
        bad(f, "pallas_gpu tiles are powers of two >= 16 (Triton); use 32, 64, 128, ...")
    if self.loss_chunk_len < 0:
      bad("loss_chunk_len", "must be >= 0 (0 computes the full [batch, length, vocab] logits)")
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
