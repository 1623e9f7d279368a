"""Sparse mixture-of-experts MLP: a softmax router picks top_k SwiGLU experts per token.

  probs_TxE = softmax(x @ router)                  (float32)
  weights_TxK, experts_TxK = top_k(probs)          (renormalised to sum 1 if norm_topk_prob)
  y = sum_j weights[j] * expert[experts[j]](x)     (+ shared experts, optionally sigmoid-gated)

Routing (moe.capacity_factor):
  dropless (0, default)  the (token, choice) slots are sorted by expert and every expert runs on
                         exactly its rows with one grouped matmul (gmm.py); nothing is dropped.
  capacity (> 0)         each expert takes at most C = ceil(capacity_factor * tokens * top_k / E)
                         slots into a fixed [E, C, D] buffer (first choices before second ones,
                         then token order); the rest are dropped (the residual carries them).
                         KV-cache generation always routes dropless.
Padding tokens (segment id 0) are routed nowhere: no expert computes them, they take no capacity,
and they count in no statistic.

Expert parallelism: expert weights [E, ...] are sharded over the mesh axes of the "exp" logical
axis. Inside a shard_map, each device routes its own tokens, all-gathers the tokens of the devices
that share its batch shard but hold other experts (the "expert" axis is also a batch axis),
computes its local experts on the slots routed to them, and a reduce-scatter returns every token's
sum to its owner (Megatron's all-gather token dispatcher). Hidden units of the experts may also
be split over "mlp" (tensor): partial outputs are summed there.

Load-balancing statistics (sown into the "intermediates" collection; train/objectives.py turns
them into losses) are per row (sequence), so they add up exactly over microbatches and devices:
  aux_r = E * sum_e f_re * P_re   f_re: share of row r's slots routed to e, P_re: mean router
                                  probability of e over row r's tokens (Switch Transformer; 1 when
                                  perfectly balanced)
  z_r   = mean over row r's tokens of logsumexp(router logits)^2   (ST-MoE router z-loss)

Shape letters as in model/__init__.py, except K, which is top_k here (experts_TxK), and T the
tokens of the batch flattened.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.model.config import ModelConfig
from llm_jax.model.gmm import auto_tile, grouped_matmul
from llm_jax.model.layers import Projection, SwiGLU

# Names of the sown statistics (per layer): see objectives.language_model.
STATS = ("moe_aux_B", "moe_z_B", "moe_load_E", "moe_dropped", "moe_slots")


def route(x_TxD, router_DxE, top_k: int, norm_topk_prob: bool):
  """(logits_TxE, probs_TxE, weights_TxK, experts_TxK), all float32 but the int32 experts.

  The router runs in float32: near-ties between experts flip under bfloat16 rounding.
  """
  logits_TxE = jnp.einsum("td,de->te", x_TxD.astype(jnp.float32), router_DxE.astype(jnp.float32))
  probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
  weights_TxK, experts_TxK = jax.lax.top_k(probs_TxE, top_k)
  if norm_topk_prob:
    weights_TxK = weights_TxK / jnp.sum(weights_TxK, axis=-1, keepdims=True)
  return logits_TxE, probs_TxE, weights_TxK, experts_TxK


def row_sums(logits_BxLxE, probs_BxLxE, experts_BxLxK, valid_BxL):
  """Per-row sums the statistics are made of: slots per expert [B, E], router probability per
  expert [B, E], valid tokens [B], logsumexp^2 [B]. Padding tokens add nothing."""
  n_experts = probs_BxLxE.shape[-1]
  valid_f = valid_BxL.astype(jnp.float32)
  onehot_BxLxKxE = jax.nn.one_hot(experts_BxLxK, n_experts, dtype=jnp.float32)
  counts_BxE = jnp.einsum("blke,bl->be", onehot_BxLxKxE, valid_f)
  probs_BxE = jnp.einsum("ble,bl->be", probs_BxLxE, valid_f)
  z_B = jnp.sum(jnp.square(jax.nn.logsumexp(logits_BxLxE, axis=-1)) * valid_f, axis=-1)
  return counts_BxE, probs_BxE, jnp.sum(valid_f, axis=-1), z_B


def row_stats(counts_BxE, probs_BxE, n_B, z_B, top_k: int):
  """aux_B (Switch load balance) and z_B (mean router z) per row; 0 for rows of padding only."""
  n_experts = counts_BxE.shape[-1]
  n_B = jnp.maximum(n_B, 1.0)
  f_BxE = counts_BxE / (n_B[:, None] * top_k)
  p_BxE = probs_BxE / n_B[:, None]
  return n_experts * jnp.sum(f_BxE * p_BxE, axis=-1), z_B / n_B


def capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
  return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_experts))


def expert_forward(x_TxD, experts_TxK, weights_TxK, valid_T, gate_ExDxF, up_ExDxF, down_ExFxD, *,
                   first_expert=0, capacity_per_expert: int | None = None, gmm: str = "auto",
                   gmm_tile: int = 0):
  """sum_j weights[t, j] * SwiGLU_{experts[t, j]}(x[t]) over the experts held here (global ids
  first_expert .. first_expert + E_local - 1); slots routed elsewhere contribute 0 here.

  Returns (y_TxD float32, slots dropped for lack of capacity).
  """
  n_tok, top_k = experts_TxK.shape
  n_local = gate_ExDxF.shape[0]
  dtype = x_TxD.dtype
  # Slot s = j * T + t (choice-major), so a stable sort puts first choices before second ones.
  expert_S = experts_TxK.T.reshape(-1) - first_expert
  token_S = jnp.tile(jnp.arange(n_tok), top_k)
  mine_S = jnp.tile(valid_T, top_k) & (expert_S >= 0) & (expert_S < n_local)
  key_S = jnp.where(mine_S, expert_S, n_local)  # others and padding sort last, into no group
  order_S = jnp.argsort(key_S, stable=True)
  key_sorted_S = key_S[order_S]
  group_sizes_G = jnp.bincount(key_S, length=n_local + 1)[:n_local].astype(jnp.int32)
  x_sorted_SxD = x_TxD[token_S[order_S]]

  if capacity_per_expert is None:
    def mm(lhs, rhs, out_dtype):
      return grouped_matmul(lhs, rhs.astype(dtype), group_sizes_G, impl=gmm, tile=gmm_tile,
                            out_dtype=out_dtype)
    h_SxF = nn.silu(mm(x_sorted_SxD, gate_ExDxF, dtype)) * mm(x_sorted_SxD, up_ExDxF, dtype)
    y_sorted_SxD = mm(h_SxF, down_ExFxD, jnp.float32)  # rows of other experts are 0
    dropped = jnp.zeros((), jnp.float32)
  else:
    cap = capacity_per_expert
    start_G = jnp.cumsum(group_sizes_G) - group_sizes_G
    # Buffer slot (e, c) holds sorted row start_e + c when c < group size e.
    slot_GxC = start_G[:, None] + jnp.arange(cap)[None, :]
    used_GxC = jnp.arange(cap)[None, :] < group_sizes_G[:, None]
    buf_GxCxD = jnp.where(used_GxC[..., None], x_sorted_SxD[jnp.minimum(slot_GxC, key_S.shape[0] - 1)], 0)
    gate_GxCxF = jnp.einsum("gcd,gdf->gcf", buf_GxCxD, gate_ExDxF.astype(dtype))
    up_GxCxF = jnp.einsum("gcd,gdf->gcf", buf_GxCxD, up_ExDxF.astype(dtype))
    y_GxCxD = jnp.einsum("gcf,gfd->gcd", nn.silu(gate_GxCxF) * up_GxCxF, down_ExFxD.astype(dtype),
                         preferred_element_type=jnp.float32)
    rank_S = jnp.arange(key_S.shape[0]) - start_G[jnp.minimum(key_sorted_S, n_local - 1)]
    kept_S = (key_sorted_S < n_local) & (rank_S < cap)
    y_sorted_SxD = jnp.where(kept_S[:, None],
                             y_GxCxD[jnp.minimum(key_sorted_S, n_local - 1), jnp.clip(rank_S, 0, cap - 1)], 0)
    dropped = jnp.sum(((key_sorted_S < n_local) & ~kept_S).astype(jnp.float32))

  # Back to slot order (a gather, not a scatter), then the weighted sum over each token's choices.
  inverse_S = jnp.zeros_like(order_S).at[order_S].set(jnp.arange(order_S.shape[0]))
  y_KxTxD = y_sorted_SxD[inverse_S].reshape(top_k, n_tok, -1)
  y_TxD = jnp.einsum("ktd,tk->td", y_KxTxD, weights_TxK.astype(jnp.float32))
  return y_TxD, dropped


def _axes(spec_entry) -> tuple[str, ...]:
  if spec_entry is None:
    return ()
  return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def _mesh_axes():
  """(batch, length, expert, hidden) mesh axes of the current logical rules, or None outside a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  act = nn.logical_to_mesh_axes(("act_batch", "act_length"))
  w = nn.logical_to_mesh_axes(("exp", "mlp"))
  live = lambda axes: tuple(a for a in axes if a in mesh.axis_names)
  return mesh, live(_axes(act[0])), live(_axes(act[1])), live(_axes(w[0])), live(_axes(w[1]))


def sparse_mlp(x_BxLxD, valid_BxL, router_DxE, gate_ExDxF, up_ExDxF, down_ExFxD, cfg: ModelConfig,
               dropless: bool = False):
  """The routed experts' output [B, L, D] (compute dtype) and the layer's statistics (STATS).

  Under a mesh (jax.set_mesh + nn.logical_axis_rules) this runs in a shard_map with expert
  parallelism (module docstring); without one, on the local arrays.
  """
  m = cfg.moe
  n_experts = m.n_experts
  dtype = cfg.compute_dtype
  use_capacity = m.capacity_factor > 0 and not dropless
  axes = _mesh_axes()
  batch_ax, length_ax, ep_ax, hidden_ax = axes[1:] if axes else ((), (), (), ())
  if axes:
    size = lambda names: math.prod(axes[0].shape[a] for a in names)
    if n_experts % size(ep_ax):
      raise ValueError(f"config.model.moe.n_experts={n_experts} must be a multiple of the expert "
                       f"mesh axes {ep_ax} (size {size(ep_ax)}); change config.mesh.expert")
    # Batches the mesh cannot split (init traces one token; odd generation batches) are given
    # whole to every device of those axes.
    if x_BxLxD.shape[0] % size(batch_ax):
      batch_ax = ()
    if x_BxLxD.shape[1] % size(length_ax):
      length_ax = ()
  token_ax = batch_ax + length_ax  # tokens differ along these
  gather_ax = tuple(a for a in ep_ax if a in token_ax)  # expert axes that also split the tokens
  replicated_ep_ax = tuple(a for a in ep_ax if a not in token_ax)

  def local(x_bxlxD, valid_bxl, router_DxE, gate_ExDxF, up_ExDxF, down_ExFxD):
    b, length, d = x_bxlxD.shape
    x_TxD, valid_T = x_bxlxD.reshape(b * length, d).astype(dtype), valid_bxl.reshape(-1)
    logits, probs, weights_TxK, experts_TxK = route(x_TxD, router_DxE, m.top_k, m.norm_topk_prob)
    sums = row_sums(logits.reshape(b, length, -1), probs.reshape(b, length, -1),
                    experts_TxK.reshape(b, length, -1), valid_bxl)
    if length_ax:  # a row split over devices: its sums are completed first
      sums = jax.lax.psum(sums, length_ax)
    aux_b, z_b = row_stats(*sums, m.top_k)
    load_E = jnp.sum(sums[0], axis=0)
    slots = jnp.sum(sums[2]) * m.top_k
    if batch_ax:
      load_E, slots = jax.lax.psum((load_E, slots), batch_ax)

    if gather_ax:
      gather = lambda a: jax.lax.all_gather(a, gather_ax, axis=0, tiled=True)
      x_TxD, valid_T, weights_TxK, experts_TxK = map(gather, (x_TxD, valid_T, weights_TxK, experts_TxK))
    first = jax.lax.axis_index(ep_ax) * gate_ExDxF.shape[0] if ep_ax else 0
    cap = capacity(x_TxD.shape[0], m.top_k, n_experts, m.capacity_factor) if use_capacity else None
    # Tiles of about the rows one expert gets (of all n_experts, not just the local ones).
    tile = m.gmm_tile or auto_tile(x_TxD.shape[0] * m.top_k, n_experts)
    y_TxD, dropped = expert_forward(x_TxD, experts_TxK, weights_TxK, valid_T, gate_ExDxF, up_ExDxF,
                                    down_ExFxD, first_expert=first, capacity_per_expert=cap,
                                    gmm=m.gmm, gmm_tile=tile)
    if gather_ax:
      y_TxD = jax.lax.psum_scatter(y_TxD, gather_ax, scatter_dimension=0, tiled=True)
    if replicated_ep_ax + hidden_ax:
      y_TxD = jax.lax.psum(y_TxD, replicated_ep_ax + hidden_ax)
    if token_ax + ep_ax:
      dropped = jax.lax.psum(dropped, tuple(dict.fromkeys(token_ax + ep_ax)))
    return y_TxD.reshape(b, length, d).astype(dtype), (aux_b, z_b, load_E, dropped, slots)

  args = (x_BxLxD, valid_BxL, router_DxE, gate_ExDxF, up_ExDxF, down_ExFxD)
  if axes is None:
    y, stats = local(*args)
  else:
    P = jax.sharding.PartitionSpec
    tok = P(batch_ax or None, length_ax or None)
    w_in, w_out = P(ep_ax or None, None, hidden_ax or None), P(ep_ax or None, hidden_ax or None, None)
    stat_specs = (P(batch_ax or None), P(batch_ax or None), P(), P(), P())
    y, stats = jax.shard_map(
        local, mesh=axes[0], in_specs=(P(*tok, None), tok, P(), w_in, w_in, w_out),
        out_specs=(P(*tok, None), stat_specs), check_vma=False)(*args)
  return y, dict(zip(STATS, stats))


class MoE(nn.Module):
  """The sparse MLP of a decoder layer: router, routed experts, optional shared experts.

  Parameters: router [D, E]; gate_proj, up_proj [E, D, F]; down_proj [E, F, D]; with shared
  experts a SwiGLU "shared_expert" of n_shared * shared_mlp_dim hidden units (n SwiGLUs summed are
  one SwiGLU that wide) and, for Qwen2-MoE, "shared_expert_gate" [D, 1].
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL, decoding: bool = False):
    cfg, m = self.cfg, self.cfg.moe
    d, e, f = cfg.dim, m.n_experts, cfg.expert_mlp_dim
    init = nn.initializers.normal(cfg.init_std)
    param = lambda name, shape, axes: self.param(
        name, nn.with_logical_partitioning(init, axes), shape, cfg.weight_dtype)
    router_DxE = param("router", (d, e), ("embed", None))
    gate_ExDxF = param("gate_proj", (e, d, f), ("exp", "embed", "mlp"))
    up_ExDxF = param("up_proj", (e, d, f), ("exp", "embed", "mlp"))
    down_ExFxD = param("down_proj", (e, f, d), ("exp", "mlp", "embed"))
    y_BxLxD, stats = sparse_mlp(x_BxLxD, segment_ids_BxL > 0, router_DxE, gate_ExDxF, up_ExDxF,
                                down_ExFxD, cfg, dropless=decoding)
    for name, value in stats.items():
      self.sow("intermediates", name, value)
    if m.n_shared_experts:
      shared_BxLxD = SwiGLU(cfg, mlp_dim=cfg.shared_mlp_dim, name="shared_expert")(x_BxLxD)
      if m.shared_expert_gate:
        gate_BxLx1 = Projection("bld,do->blo", (d, 1), ("embed", None), cfg,
                                name="shared_expert_gate")(x_BxLxD)
        shared_BxLxD = nn.sigmoid(gate_BxLx1) * shared_BxLxD
      y_BxLxD = y_BxLxD + shared_BxLxD
    return nn.with_logical_constraint(y_BxLxD, ("act_batch", "act_length", "act_embed"))


def collect_stats(intermediates, cfg: ModelConfig) -> dict:
  """The sown statistics summed over the sparse layers (any layout: scanned, blocks, unrolled)."""
  out = {}
  flat = jax.tree_util.tree_flatten_with_path(intermediates)[0]
  for name in STATS:
    leaves = [v for path, v in flat if any(getattr(k, "key", None) == name for k in path)]
    if not leaves:
      raise ValueError(f"no MoE statistic {name!r} was sown; was the model applied with "
                       "mutable=['intermediates']?")
    ndim = {"moe_aux_B": 1, "moe_z_B": 1, "moe_load_E": 1, "moe_dropped": 0, "moe_slots": 0}[name]
    out[name] = sum(jnp.sum(v.reshape((-1,) + v.shape[v.ndim - ndim:]), axis=0) for v in leaves)
  return out


def objective_sums(intermediates, weights_BxL, cfg: ModelConfig) -> dict:
  """The MoE terms of the LM objective, as sums over rows (objectives.py: everything is a sum).

  Each row's load-balance and z statistics are summed over the sparse layers and weighted by the
  row's trained tokens, so `loss` += coef * these / sum(weights) is a token-weighted mean of
  per-row losses: additive over microbatches and devices, and zero for rows trained on nothing.
  """
  m = cfg.moe
  s = collect_stats(intermediates, cfg)
  w_B = jnp.sum(weights_BxL.astype(jnp.float32), axis=-1)
  aux, z = jnp.sum(w_B * s["moe_aux_B"]), jnp.sum(w_B * s["moe_z_B"])
  n = cfg.n_sparse_layers
  out = {"moe_loss": m.aux_loss_coef * aux + m.z_loss_coef * z,
         "moe_aux": aux / n, "moe_z": z / n,  # reported per layer
         "moe_dropped": s["moe_dropped"] / n, "moe_slots": s["moe_slots"] / n}
  out.update({f"moe_tokens_{j}": s["moe_load_E"][j] / n for j in range(m.n_experts)})
  return out


def sum_keys(cfg: ModelConfig) -> tuple[str, ...]:
  return ("moe_loss", "moe_aux", "moe_z", "moe_dropped", "moe_slots") + tuple(
      f"moe_tokens_{j}" for j in range(cfg.moe.n_experts))


def objective_metrics(s: dict, cfg: ModelConfig) -> dict:
  """Per-step figures, mean over the sparse layers: aux (1.0 = perfectly balanced), z, the
  busiest expert's load over the mean load, routed slots per expert, dropped share (capacity)."""
  weight = jnp.maximum(s["weight"], 1.0)
  tokens_E = jnp.stack([s[f"moe_tokens_{j}"] for j in range(cfg.moe.n_experts)])
  out = {"moe_loss": s["moe_loss"] / weight,  # what the router losses add to the loss
         "moe_aux_loss": s["moe_aux"] / weight, "moe_z_loss": s["moe_z"] / weight,
         "moe_load_max": jnp.max(tokens_E) / jnp.maximum(jnp.mean(tokens_E), 1e-9)}
  out.update({f"moe_tokens_per_expert/{j}": tokens_E[j] for j in range(cfg.moe.n_experts)})
  if cfg.moe.capacity_factor > 0:
    out["moe_dropped_share"] = s["moe_dropped"] / jnp.maximum(s["moe_slots"], 1.0)
  return out
