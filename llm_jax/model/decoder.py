"""The decoder: a Llama / Qwen2 / Qwen3-family transformer in flax.linen, applied functionally.

  logits_BxLxV = Decoder(cfg).apply({"params": params}, inputs_BxL, positions_BxL, segment_ids_BxL)
  logits_BxLxV, cache = Decoder(cfg).apply({"params": params}, ..., cache=cache)

The parameter tree is the one convert/hf_weights.py maps to Hugging Face tensors. Layers are
stacked under one `nn.scan` ("layers", leading n_layers axis) when cfg.scan_layers, else unrolled as
"layers_0".."layers_{n-1}". A sparse (MoE) layer has "moe" where a dense one has "mlp"; when
only every k-th layer is sparse, scanning goes over blocks of k layers ("layers"/"layer_{j}").
Outside a mesh context the logical constraints are no-ops; to run
sharded, trace inside `with jax.set_mesh(mesh), nn.logical_axis_rules(rules):` (see sharding.py).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.model import cpu, lora as lora_lib, precision
from llm_jax.model.attention import Attention, one_token_step, write_token
from llm_jax.model.config import ModelConfig
from llm_jax.model.layers import Projection, RMSNorm, SwiGLU
from llm_jax.model.moe import MoE

# Logical axes of each cache array ([n_layers, batch, max_len, n_kv_heads, head_dim]).
CACHE_AXES = ("layers", "cache_batch", "cache_length", "act_kv_heads", "act_head_dim")
# ... and of each layer's array in the per-layer layout ([batch, n_kv_heads, max_len, head_dim]).
LAYER_CACHE_AXES = ("cache_batch", "act_kv_heads", "cache_length", "act_head_dim")


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None, per_layer: bool = False) -> dict:
  """An empty KV cache: {"k", "v"} of [n_layers, batch, max_len, n_kv_heads, head_dim].

  Slot j holds the key/value of the token at position j; a query at position p attends to slots
  j <= p. Right-padded prompts of different lengths share one cache: their pad tokens are not
  written, and the slots after a prompt are filled by its generated tokens before any query can
  see them.

  per_layer: {"k", "v"} of n_layers separate head-major [batch, n_kv_heads, max_len, head_dim]
  arrays instead (unrolled layers only, `scan_layers=False`). Each layer then reads its own
  buffer and writes its token in place: a stacked cache made XLA's CPU backend copy every layer's
  slice out of it, and the whole cache twice, at every decoded token (about a third of a step at
  batch 8). Head-major, a decoding query's scores and its value sum are two batched matmuls over
  contiguous [max_len, head_dim] blocks (`attention.attention_over_cache`).
  """
  shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
  dtype = cfg.compute_dtype if dtype is None else dtype
  if per_layer:
    if cfg.scan_layers:
      raise ValueError("a per-layer KV cache needs unrolled layers (scan_layers=False; see unstack_layers)")
    shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
    return {name: [jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)] for name in ("k", "v")}
  return {name: jnp.zeros((cfg.n_layers,) + shape, dtype) for name in ("k", "v")}


def is_per_layer(cache) -> bool:
  """True for init_cache(..., per_layer=True)'s layout (lists of per-layer arrays)."""
  return cache is not None and isinstance(cache["k"], (list, tuple))


def _constrain_cache(cache: dict) -> dict:
  if is_per_layer(cache):
    return {name: [nn.with_logical_constraint(c, LAYER_CACHE_AXES) for c in cs] for name, cs in cache.items()}
  return {name: nn.with_logical_constraint(c, CACHE_AXES) for name, c in cache.items()}


def unstack_layers(params, cfg: ModelConfig):
  """(params, cfg) of the same model with unrolled layers: the stacked "layers" tree (scan
  layout) split into "layers_0".."layers_{n-1}". The values are unchanged; a stacked tree makes
  XLA copy each layer's weights out of it on every call, which dominates decoding on a CPU."""
  if not cfg.scan_layers:
    return params, cfg
  out = {k: v for k, v in params.items() if k != "layers"}
  every = cfg.moe.every if cfg.moe.enabled and cfg.moe.every > 1 else 0
  for i in range(cfg.n_layers):
    if every:  # scanned DecoderBlocks: "layers"/"layer_{j}" stacked over blocks
      out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i // every],
                                        params["layers"][f"layer_{i % every}"])
    else:
      out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
  return out, dataclasses.replace(cfg, scan_layers=False)


def _remat_policy(name: str):
  policies = {
      "full": None,  # save nothing: recompute the whole layer in the backward pass
      "dots": jax.checkpoint_policies.checkpoint_dots,
      "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
      "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
  }
  return policies[name]


class Embed(nn.Module):
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("vocab", "embed")),
        (cfg.vocab_size, cfg.dim), cfg.weight_dtype)
    self.lora_ab = lora_lib.embed_adapter(self) if cfg.lora is not None else None

  def __call__(self, ids_BxL):
    # Gather the table whole before the lookup (FSDP gathers every weight for use anyway); a
    # gather from a table sharded over vocab and embed makes XLA replicate the result instead.
    table_VxD = nn.with_logical_constraint(self.embedding, (None, "act_embed"))
    x_BxLxD = jnp.take(table_VxD, ids_BxL, axis=0).astype(self.cfg.compute_dtype)
    if self.lora_ab is not None:  # LoRA on the table (config.lora.targets has "embed")
      x_BxLxD = x_BxLxD + lora_lib.embed_lookup_delta(self, self.lora_ab, ids_BxL)
    return nn.with_logical_constraint(x_BxLxD, ("act_batch", "act_length", "act_embed"))

  def attend(self, x_BxLxD):
    """Tied output projection: logits = x @ embedding^T, accumulated and returned in float32."""
    dtype = self.cfg.compute_dtype
    logits_BxLxV = precision.einsum_f32_out("bld,vd->blv", x_BxLxD.astype(dtype),
                                            self.embedding.astype(dtype))
    if self.lora_ab is not None:  # the adapted table is the tied head too (merge stays exact)
      logits_BxLxV = logits_BxLxV + lora_lib.embed_attend_delta(self, self.lora_ab, x_BxLxD)
    return logits_BxLxV


class DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). Returns (x, this layer's new cache)."""
  cfg: ModelConfig
  sparse: bool = False  # a mixture-of-experts MLP ("moe") instead of the dense one ("mlp")
  own_cache: bool = False  # this layer's own [B, K, S, H] cache buffer: see Attention.own_cache
  fresh_cache: bool = False  # prefill of an empty cache: see Attention.fresh_cache

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, cache=None):
    cfg = self.cfg
    act_axes = ("act_batch", "act_length", "act_embed")
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, act_axes)
    h_BxLxD = RMSNorm(cfg.rms_eps, cfg.compute_dtype, cfg.weight_dtype, name="attn_norm")(x_BxLxD)
    h_BxLxD, new_cache = Attention(cfg, self.own_cache, self.fresh_cache, name="attn")(
        h_BxLxD, positions_BxL, segment_ids_BxL, cache)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD + h_BxLxD, act_axes)
    h_BxLxD = RMSNorm(cfg.rms_eps, cfg.compute_dtype, cfg.weight_dtype, name="mlp_norm")(x_BxLxD)
    if self.sparse:
      h_BxLxD = MoE(cfg, name="moe")(h_BxLxD, segment_ids_BxL, decoding=cache is not None)
    else:
      h_BxLxD = SwiGLU(cfg, name="mlp")(h_BxLxD)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD + h_BxLxD, act_axes)
    return x_BxLxD, new_cache


class DecoderBlock(nn.Module):
  """`cfg.moe.every` consecutive layers, the last one sparse ("layer_0".."layer_{k-1}"): the unit
  scanned when only every k-th layer is a mixture of experts. The cache holds [k, ...] arrays."""
  cfg: ModelConfig
  fresh_cache: bool = False  # see Attention.fresh_cache

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, cache=None):
    k = self.cfg.moe.every
    caches = []
    for j in range(k):
      layer_cache = None if cache is None else {name: c[j] for name, c in cache.items()}
      x_BxLxD, layer_cache = DecoderLayer(self.cfg, j == k - 1, fresh_cache=self.fresh_cache,
                                          name=f"layer_{j}")(
          x_BxLxD, positions_BxL, segment_ids_BxL, layer_cache)
      caches.append(layer_cache)
    if cache is None:
      return x_BxLxD, None
    return x_BxLxD, {name: jnp.stack([c[name] for c in caches]) for name in cache}


class Decoder(nn.Module):
  cfg: ModelConfig
  # The cache passed in holds nothing yet and positions start at 0 (a new prompt): each layer
  # attends over the new tokens alone and writes them, instead of attending over the whole cache.
  # Generation's prefill sets it.
  fresh_cache: bool = False

  @nn.compact
  def __call__(self, inputs_BxL, positions_BxL, segment_ids_BxL, cache=None, logits_at_BxK=None,
               return_hidden=False):
    """Logits [B, L, V] float32 (and the new cache when `cache` is given).

    logits_at_BxK: optional sequence indices; then only those K positions get logits ([B, K, V]),
    e.g. the last prompt token in prefill, which saves a [B, L, V] matmul over the vocabulary.
    return_hidden: return the final-normed hidden states [B, L, D] (compute dtype) instead of
    the logits; `output_weights` gives the matrix that maps them to logits (chunked losses).
    """
    cfg = self.cfg
    embed = Embed(cfg, name="embed")
    x_BxLxD = nn.with_logical_constraint(embed(inputs_BxL), ("act_batch", "act_length", "act_embed"))

    layer_cls = DecoderLayer
    if cfg.remat_policy != "none":
      # prevent_cse is only needed outside scan (scan already stops CSE across iterations).
      layer_cls = nn.remat(DecoderLayer, policy=_remat_policy(cfg.remat_policy),
                           prevent_cse=not cfg.scan_layers)
    blocks = cfg.moe.enabled and cfg.moe.every > 1 and cfg.scan_layers
    if blocks:  # scan over blocks of `every` layers (only every k-th layer is sparse)
      layer_cls = DecoderBlock
      if cfg.remat_policy != "none":
        layer_cls = nn.remat(DecoderBlock, policy=_remat_policy(cfg.remat_policy), prevent_cse=False)
    if cfg.scan_layers:
      n_scanned = cfg.n_layers // cfg.moe.every if blocks else cfg.n_layers
      scan_cache = cache  # blocks: [n_blocks, every, ...]; `cache` stays whole for write_token
      if blocks and cache is not None:
        scan_cache = {name: c.reshape((n_scanned, cfg.moe.every) + c.shape[1:]) for name, c in cache.items()}
      # LoRA adapters ("lora") stack like the weights; each layer draws its own dropout masks.
      # "intermediates": MoE layers sow their routing statistics, one entry per scanned layer.
      stack = nn.scan(layer_cls, variable_axes={"params": 0, "lora": 0, "intermediates": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast, 0),
                      length=n_scanned, unroll=cpu.scan_unroll(n_scanned),
                      metadata_params={nn.PARTITION_NAME: "layers"})
      layer_args = (cfg,) if blocks else (cfg, cfg.moe.enabled)
      x_BxLxD, new_cache = stack(*layer_args, fresh_cache=self.fresh_cache, name="layers")(x_BxLxD, positions_BxL, segment_ids_BxL,
                                                          scan_cache)
      if blocks and new_cache is not None:
        new_cache = {name: c.reshape((cfg.n_layers,) + c.shape[2:]) for name, c in new_cache.items()}
      if one_token_step(cache, inputs_BxL.shape[1]):  # new_cache holds [n_layers, B, 1, K, H] tokens
        new_cache = {name: write_token(cache[name], new_cache[name], positions_BxL, segment_ids_BxL)
                     for name in cache}
    elif one_token_step(cache, inputs_BxL.shape[1]):
      # Per-layer buffers: each layer writes its token into its own cache, then attends to it
      # (in place). A stacked cache: each layer returns its token and all are written at the end.
      per_layer = is_per_layer(cache)
      outs = []
      for i in range(cfg.n_layers):
        x_BxLxD, layer_out = layer_cls(cfg, cfg.is_sparse_layer(i), own_cache=per_layer,
                                       name=f"layers_{i}")(
            x_BxLxD, positions_BxL, segment_ids_BxL, {name: c[i] for name, c in cache.items()})
        outs.append(layer_out)
      if per_layer:
        new_cache = {name: [o[name] for o in outs] for name in cache}
      else:
        new_cache = {name: write_token(cache[name], jnp.stack([o[name] for o in outs]),
                                       positions_BxL, segment_ids_BxL) for name in cache}
    else:
      new_cache = None if cache is None else dict(cache)
      for i in range(cfg.n_layers):
        # Read layer i from the running cache (equal to the input there), so XLA updates it in place.
        layer_cache = None if cache is None else {name: c[i] for name, c in new_cache.items()}
        x_BxLxD, layer_cache = layer_cls(cfg, cfg.is_sparse_layer(i), own_cache=is_per_layer(cache),
                                         fresh_cache=self.fresh_cache, name=f"layers_{i}")(
            x_BxLxD, positions_BxL, segment_ids_BxL, layer_cache)
        if is_per_layer(cache):
          new_cache = {name: [*cs[:i], layer_cache[name], *cs[i + 1:]] for name, cs in new_cache.items()}
        elif cache is not None:
          new_cache = {name: new_cache[name].at[i].set(layer_cache[name]) for name in new_cache}
    if new_cache is not None:
      new_cache = _constrain_cache(new_cache)

    if logits_at_BxK is not None:
      x_BxLxD = jnp.take_along_axis(x_BxLxD, logits_at_BxK[:, :, None], axis=1)
    x_BxLxD = RMSNorm(cfg.rms_eps, cfg.compute_dtype, cfg.weight_dtype, name="final_norm")(x_BxLxD)
    if return_hidden and not self.is_initializing():  # init still creates the output projection
      x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("act_batch", "act_length", "act_embed"))
      return x_BxLxD if cache is None else (x_BxLxD, new_cache)
    if cfg.tie_embeddings:
      logits_BxLxV = embed.attend(x_BxLxD)
    else:
      logits_BxLxV = Projection("bld,dv->blv", (cfg.dim, cfg.vocab_size), ("embed", "vocab"), cfg,
                                out_dtype=jnp.float32, name="lm_head")(x_BxLxD)
    logits_BxLxV = nn.with_logical_constraint(logits_BxLxV.astype(jnp.float32),
                                              ("act_batch", "act_length", "act_vocab"))
    if cache is None:
      return logits_BxLxV
    return logits_BxLxV, new_cache


def output_weights(params, cfg: ModelConfig) -> tuple[jax.Array, str]:
  """(the output projection's parameter, its einsum from hidden [b, l, d] to logits): the tied
  embedding [V, D] or the lm_head kernel [D, V]; logits = einsum(eq, hidden, w)."""
  if cfg.tie_embeddings:
    return params["embed"]["embedding"], "bld,vd->blv"
  return params["lm_head"]["kernel"], "bld,dv->blv"
