"""Parameter counts and training FLOPs per token (for MFU)."""

import jax
import numpy as np
from flax import traverse_util

from llm_jax.model import lora
from llm_jax.model.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
  """N of the FLOPs formula: weights that take part in a matmul per token.

  Counts q/k/v/o and the three SwiGLU projections of every layer plus the output projection
  (dim * vocab, whether tied or not: the logits matmul is done either way). Excludes the embedding
  lookup (a gather, no FLOPs), norm scales and biases. A mixture-of-experts layer counts its
  *active* weights: the router, top_k experts and the shared experts, not all n_experts.
  """
  attn = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
  mlp = 3 * cfg.dim * cfg.mlp_dim
  n = cfg.n_layers * (attn + mlp) + cfg.dim * cfg.vocab_size
  if cfg.moe.enabled:
    n += cfg.n_sparse_layers * (moe_active_params(cfg) - mlp)
  return n


def moe_active_params(cfg: ModelConfig) -> int:
  """Weights one token multiplies in a sparse layer: router, top_k routed and all shared experts."""
  m = cfg.moe
  shared = 3 * cfg.dim * cfg.shared_mlp_dim + (cfg.dim if m.shared_expert_gate else 0)
  return cfg.dim * m.n_experts + m.top_k * 3 * cfg.dim * cfg.expert_mlp_dim + shared


def active_param_count(cfg: ModelConfig, params) -> int:
  """All parameters minus the routed experts a token does not use (n_experts - top_k per layer)."""
  total = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
  if not cfg.moe.enabled:
    return total
  idle = (cfg.moe.n_experts - cfg.moe.top_k) * 3 * cfg.dim * cfg.expert_mlp_dim
  return total - cfg.n_sparse_layers * idle


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training (forward + backward) FLOPs per token, PaLM appendix B:

    6 * N + 12 * n_layers * n_heads * head_dim * seq_len

  with N = `matmul_params(cfg)`. The attention term counts the full L x L score and value matmuls
  (no discount for causality or packing), as PaLM and MaxText do.

  With LoRA the frozen weights get no weight gradients, so they cost 4 * N (forward, and the
  backward to their inputs), and each adapter parameter the full 6.
  """
  if cfg.lora is not None:
    return float(4 * matmul_params(cfg) + 6 * lora.trainable_count(cfg)
                 + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len)
  return float(6 * matmul_params(cfg) + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len)


def param_counts(params) -> dict:
  """{"total", "embedding" (input table), "lm_head" (0 when tied), "non_embedding" (the rest)}."""
  flat = traverse_util.flatten_dict(params, sep="/")
  size = lambda k: int(np.prod(flat[k].shape)) if k in flat else 0
  total = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
  emb, head = size("embed/embedding"), size("lm_head/kernel")
  return {"total": total, "embedding": emb, "lm_head": head, "non_embedding": total - emb - head}
