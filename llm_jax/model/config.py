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
ROPE_SCALING_TYPES = ("none", "linear", "llama3", "yarn")
GMM_IMPLS = ("auto", "ragged_dot", "tiled")

# Fields that define the weights (their shapes, their meaning, and the checkpoint's tree layout:
# scanned layers are stored stacked). Everything else in config.model (dtypes, remat, attention
# kernel) is a runtime choice the new job may change; parameters are cast to its param_dtype.
SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim",
                "rope_theta", "rms_eps", "qkv_bias", "qk_norm", "tie_embeddings", "scan_layers")
# Dotted sub-config fields that define the weights too (a run written before a sub-config existed
# had its defaults: dense MLPs, unscaled RoPE). Routing choices (capacity, loss weights, kernels)
# stay the new job's.
SUB_SHAPE_FIELDS = ("moe.n_experts", "moe.top_k", "moe.expert_mlp_dim", "moe.n_shared_experts",
                    "moe.shared_mlp_dim", "moe.shared_expert_gate", "moe.every", "moe.norm_topk_prob",
                    "rope_scaling.type", "rope_scaling.factor",
                    "rope_scaling.original_max_position_embeddings", "rope_scaling.low_freq_factor",
                    "rope_scaling.high_freq_factor", "rope_scaling.beta_fast", "rope_scaling.beta_slow",
                    "rope_scaling.attention_factor", "rope_scaling.mscale",
                    "rope_scaling.mscale_all_dim", "rope_scaling.truncate")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Scaled RoPE (`config.model.rope_scaling`), as transformers' `rope_parameters` define it.

  linear: inv_freq / factor. llama3 (Llama 3.1 / 3.2): low frequencies / factor, high ones kept,
  a smooth ramp between. yarn: per-frequency blend of interpolation and extrapolation, and cos/sin
  scaled by an attention factor. See layers.rope_frequencies.
  """
  type: str = "none"
  factor: float = 1.0
  original_max_position_embeddings: int = 0  # llama3 / yarn: the pretraining context length
  low_freq_factor: float = 1.0  # llama3
  high_freq_factor: float = 4.0  # llama3
  beta_fast: float = 32.0  # yarn
  beta_slow: float = 1.0  # yarn
  attention_factor: float = 0.0  # yarn; 0 derives it from factor (and mscale / mscale_all_dim)
  mscale: float = 0.0  # yarn (DeepSeek-style attention factor); 0 = unused
  mscale_all_dim: float = 0.0  # yarn; 0 = unused
  truncate: bool = True  # yarn: round the correction range to whole dimensions


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Sparse mixture-of-experts MLPs (`config.model.moe`); n_experts=0 is a dense model.

  Layer i is sparse when (i + 1) % every == 0 (transformers' `decoder_sparse_step`). See moe.py.
  """
  n_experts: int = 0
  top_k: int = 2
  expert_mlp_dim: int = 0  # 0 = mlp_dim
  n_shared_experts: int = 0
  shared_mlp_dim: int = 0  # per shared expert; 0 = expert_mlp_dim
  shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x @ w) scales the shared experts
  every: int = 1
  norm_topk_prob: bool = True
  aux_loss_coef: float = 0.01
  z_loss_coef: float = 0.0
  capacity_factor: float = 0.0  # 0 = dropless
  gmm: str = "auto"
  gmm_tile: int = 0  # 0 = about the mean group size (gmm.auto_tile)

  @property
  def enabled(self) -> bool:
    return self.n_experts > 0


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
  tie_embeddings: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  attention: str = "auto"
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
  rope_scaling: RopeScaling = RopeScaling()
  moe: MoEConfig = MoEConfig()

  @property
  def expert_mlp_dim(self) -> int:
    return self.moe.expert_mlp_dim or self.mlp_dim

  @property
  def shared_mlp_dim(self) -> int:
    """Hidden size of the fused shared experts (n_shared SwiGLUs summed = one SwiGLU this wide)."""
    return self.moe.n_shared_experts * (self.moe.shared_mlp_dim or self.expert_mlp_dim)

  def is_sparse_layer(self, i: int) -> bool:
    return self.moe.enabled and (i + 1) % self.moe.every == 0

  @property
  def n_sparse_layers(self) -> int:
    return sum(self.is_sparse_layer(i) for i in range(self.n_layers))

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
    self._validate_rope_scaling()
    self._validate_moe()
    return self

  def _validate_rope_scaling(self):
    r = self.rope_scaling

    def bad(field, why):
      raise ValueError(f"config.model.rope_scaling.{field}={getattr(r, field)!r}: {why}")
    if r.type not in ROPE_SCALING_TYPES:
      bad("type", f"must be one of {ROPE_SCALING_TYPES}")
    if r.type == "none":
      return
    if not r.factor >= 1:
      bad("factor", f"rope_scaling.type={r.type!r} needs a factor >= 1")
    if r.type in ("llama3", "yarn") and r.original_max_position_embeddings <= 0:
      bad("original_max_position_embeddings", f"rope_scaling.type={r.type!r} needs the pretraining "
          "context length (e.g. 8192 for Llama 3.x)")
    if r.type == "llama3" and not 0 < r.low_freq_factor < r.high_freq_factor:
      bad("high_freq_factor", f"must be > low_freq_factor={r.low_freq_factor} > 0")
    if r.type == "yarn" and not r.beta_fast > r.beta_slow > 0:
      bad("beta_fast", f"must be > beta_slow={r.beta_slow} > 0")
    if r.attention_factor < 0:
      bad("attention_factor", "must be >= 0 (0 derives it from factor)")

  def _validate_moe(self):
    m = self.moe

    def bad(field, why):
      raise ValueError(f"config.model.moe.{field}={getattr(m, field)!r}: {why}")
    if m.n_experts < 0:
      bad("n_experts", "must be >= 0 (0 = dense MLPs)")
    if not m.enabled:
      return
    if not 1 <= m.top_k <= m.n_experts:
      bad("top_k", f"must be between 1 and n_experts={m.n_experts}")
    for f in ("expert_mlp_dim", "n_shared_experts", "shared_mlp_dim", "aux_loss_coef", "z_loss_coef",
              "capacity_factor"):
      if getattr(m, f) < 0:
        bad(f, "must be >= 0")
    if not 1 <= m.every <= self.n_layers:
      bad("every", f"must be between 1 (every layer sparse) and n_layers={self.n_layers}")
    if self.scan_layers and self.n_layers % m.every:
      bad("every", f"with scan_layers=True it must divide n_layers={self.n_layers} (layers are "
          "scanned in blocks of `every`); or set --config.model.scan_layers=false")
    if m.shared_expert_gate and not m.n_shared_experts:
      bad("shared_expert_gate", "needs n_shared_experts > 0")
    if m.gmm not in GMM_IMPLS:
      bad("gmm", f"must be one of {GMM_IMPLS}")
    if m.gmm_tile < 0 or m.gmm_tile % 8:
      bad("gmm_tile", "must be 0 (automatic) or a positive multiple of 8")

  @classmethod
  def from_config(cls, cfg, vocab_size: int | None = None) -> "ModelConfig":
    """Builds from the `config.model` ConfigDict; `head_dim=0` means dim // n_heads."""
    d = {f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name in cfg}
    # Sub-configs (absent from runs written before they existed: then the dense, unscaled defaults).
    for name, sub in (("rope_scaling", RopeScaling), ("moe", MoEConfig)):
      if name in d:
        d[name] = sub(**{f.name: d[name][f.name] for f in dataclasses.fields(sub) if f.name in d[name]})
    if vocab_size is not None and not d.get("vocab_size"):
      d["vocab_size"] = vocab_size
    if not d.get("head_dim"):
      d["head_dim"] = d["dim"] // d["n_heads"]
    return cls(**d).validate()


def sub_field_default(dotted: str):
  """The default of a sub-config field ("moe.n_experts"): what a run written before that
  sub-config existed had."""
  section, field = dotted.split(".")
  return getattr({"moe": MoEConfig, "rope_scaling": RopeScaling}[section](), field)
