"""Per-device memory of a training step, for any mesh shape, without the devices.

Exact: the train state. Parameter shapes and logical axes come from `jax.eval_shape` of the
model's real initialiser, the optimizer state from `jax.eval_shape(optimizer.init)`; each array
is divided over the mesh axes its logical axes map to (`config.sharding_rules`), as the trainer
places it (`state.state_shardings`). JAX only shards evenly: an axis that does not divide its
dimension makes the mesh infeasible (`Indivisible`).

Estimates: activations saved for the backward pass per remat policy, the logits, gradients and
the optimizer update. They count the tensors autodiff keeps per layer and token (see
`_saved_per_token`); XLA's fusion and buffer reuse move the true figure by tens of percent.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from llm_jax.model import init as model_init
from llm_jax.model.config import ModelConfig, REMAT_POLICIES


class Indivisible(ValueError):
  """A sharded dimension does not divide evenly over its mesh axes."""


def _shard_elems(shape, spec: P, mesh_sizes: dict, what: str) -> int:
  n = 1
  for i, dim in enumerate(shape):
    entry = spec[i] if i < len(spec) else None
    names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
    ways = math.prod(mesh_sizes.get(a, 1) for a in names)  # an axis not given (expert) is 1
    if dim % ways:
      raise Indivisible(f"{what}: dimension {dim} does not divide over mesh axes {names} ({ways} ways)")
    n *= dim // ways
  return n


def state_bytes(model_cfg: ModelConfig, optimizer: optax.GradientTransformation,
                mesh_sizes: dict, rules) -> dict[str, int]:
  """{"params", "optimizer"} bytes on each device (optimizer: its state plus the step counter),
  exactly as the trainer allocates them; raises Indivisible for meshes JAX cannot lay out."""
  shapes, specs = model_init.mesh_specs(model_cfg, rules)
  opt_shapes = jax.eval_shape(optimizer.init, shapes)
  # Optimizer moments follow their parameter's sharding; counters are replicated (as state.py).
  opt_specs = optax.tree_map_params(optimizer, lambda _, s: s, opt_shapes, specs,
                                    transform_non_params=lambda _: P(),
                                    is_leaf=lambda x: isinstance(x, P))

  def total(tree, spec_tree, what):
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    spec_leaves = jax.tree.leaves(spec_tree, is_leaf=lambda x: isinstance(x, P))
    return sum(_shard_elems(x.shape, s, mesh_sizes, f"{what}{jax.tree_util.keystr(path)}")
               * jnp.dtype(x.dtype).itemsize for (path, x), s in zip(leaves, spec_leaves))

  step_bytes = jnp.dtype(jnp.int32).itemsize
  return {"params": total(shapes, specs, "params"),
          "optimizer": total(opt_shapes, opt_specs, "opt_state") + step_bytes}


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one device sees the step: rows of its microbatch and its share of the heads etc."""
  rows: int  # sequences per device per microbatch
  seq_len: int
  tensor: int  # size of the tensor-parallel axis


def _split(n: int, ways: int) -> int:
  return n // ways if n % ways == 0 else n  # not divisible: the kernel/XLA keeps it whole


def _saved_per_token(cfg: ModelConfig, layout: Layout, fused_attention: bool) -> dict[str, float]:
  """Bytes per token per layer that autodiff keeps for the backward pass, by what keeps them.

  a = bytes of the compute dtype. Per layer, without remat: the layer input and the two norm
  outputs and residual (4 D), q/k/v ((N + 2K) H), the attention output (N H), gate, up and
  their product (3 F); the XLA attention adds, per key, its float32 scores and softmax and the
  softmax's compute-dtype copy (N L (8 + a)) and the [L, L] mask (L bytes); a fused kernel adds
  its log-sum-exp (N float32 values).
  """
  a = jnp.dtype(cfg.compute_dtype).itemsize
  t = layout.tensor
  n, k, f = _split(cfg.n_heads, t), _split(cfg.n_kv_heads, t), _split(cfg.mlp_dim, t)
  h, d, length = cfg.head_dim, cfg.dim, layout.seq_len
  attn_scores = 4 * n if fused_attention else n * length * (8 + a) + length
  return {
      "input": d * a,
      "norms_residual": 3 * d * a,
      "qkv": (n + 2 * k) * h * a,
      "attn_out": n * h * a,
      "scores": attn_scores,
      "score_dot": 0 if fused_attention else n * length * 4,  # what "dots" keeps of attention
      "proj_out": 2 * d * a,  # o_proj and down_proj outputs
      "mlp": 3 * f * a,
  }


def activation_bytes(cfg: ModelConfig, layout: Layout, policy: str, fused_attention: bool) -> float:
  """Estimated activation bytes per device for a remat policy (config.model.remat_policy):
  what every layer keeps, plus the rest of one layer, recomputed during its backward pass."""
  s = _saved_per_token(cfg, layout, fused_attention)
  whole = s["input"] + s["norms_residual"] + s["qkv"] + s["attn_out"] + s["scores"] + s["mlp"]
  kept = {
      "none": whole,
      "full": s["input"],
      "save_attn_out": s["input"] + s["attn_out"],
      "dots_with_no_batch_dims": s["input"] + s["qkv"] + s["proj_out"] + 2 / 3 * s["mlp"],
      "dots": s["input"] + s["qkv"] + s["proj_out"] + 2 / 3 * s["mlp"] + s["attn_out"] + s["score_dot"],
  }[policy]
  recompute = whole - kept  # one layer's other activations, rebuilt during its backward pass
  tokens = layout.rows * layout.seq_len
  embed_and_final_norm = 2 * cfg.dim * jnp.dtype(cfg.compute_dtype).itemsize
  return tokens * (cfg.n_layers * kept + recompute + embed_and_final_norm)


def logits_bytes(cfg: ModelConfig, layout: Layout) -> float:
  """Estimated bytes of the output layer's logits and their gradient per device: float32
  logits, float32 dlogits and their compute-dtype copy, for the whole sequence or one chunk
  (config.model.loss_chunk_len, which also keeps dL/dhidden [rows, L, D])."""
  a = jnp.dtype(cfg.compute_dtype).itemsize
  v = _split(cfg.vocab_size, layout.tensor)
  per_position = layout.rows * v * (4 + 4 + a)
  if cfg.loss_chunk_len:
    return per_position * min(cfg.loss_chunk_len, layout.seq_len) + layout.rows * layout.seq_len * cfg.dim * a
  return per_position * layout.seq_len


def estimates(cfg: ModelConfig, layout: Layout, params_bytes: int, fused_attention: bool,
              grad_accum: int = 1) -> dict:
  """Per-device estimates: gradients + update, logits, and activations for every remat policy."""
  # Gradients in the parameters' dtype and sharding, the optimizer's update tree beside them,
  # and with accumulation the running sum of microbatch gradients.
  grads = params_bytes * (2 + (grad_accum > 1))
  return {"gradients_and_update": grads, "logits": logits_bytes(cfg, layout),
          "activations": {p: activation_bytes(cfg, layout, p, fused_attention)
                          for p in REMAT_POLICIES}}
