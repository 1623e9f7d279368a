"""An independent float64 numpy forward of the decoder, written from the math (HF Llama/Qwen2/Qwen3
modelling code), not from llm_jax.model. Takes the unrolled (layers_i) parameter tree."""

import numpy as np


def _rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x_LxNxH, pos_L, cfg):
  h = x_LxNxH.shape[-1]
  inv, scale = _rope_inv_freq(h, cfg)
  ang = pos_L[:, None] * inv[None, :]
  emb = np.concatenate([ang, ang], axis=-1)[:, None, :]  # [L, 1, H]
  rot = np.concatenate([-x_LxNxH[..., h // 2:], x_LxNxH[..., :h // 2]], axis=-1)
  return (x_LxNxH * np.cos(emb) + rot * np.sin(emb)) * scale


def _swiglu(h, gate, up, down):
  g, u = h @ gate, h @ up
  return (g / (1 + np.exp(-g)) * u) @ down


def moe_reference(h_LxD, p, cfg):
  """A sparse MLP token by token: softmax router, top_k, optional renormalisation, a naive loop
  over the chosen experts, plus the (gated) shared experts. Returns (out [L, D], router logits)."""
  m = cfg.moe
  logits = h_LxD @ p["router"]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.zeros_like(h_LxD)
  for t in range(len(h_LxD)):
    chosen = np.argsort(-probs[t], kind="stable")[:m.top_k]
    w = probs[t, chosen] / (probs[t, chosen].sum() if m.norm_topk_prob else 1.0)
    for e, w_e in zip(chosen, w):
      out[t] += w_e * _swiglu(h_LxD[t], p["gate_proj"][e], p["up_proj"][e], p["down_proj"][e])
  if m.n_shared_experts:
    sh = p["shared_expert"]
    shared = _swiglu(h_LxD, sh["gate_proj"]["kernel"], sh["up_proj"]["kernel"], sh["down_proj"]["kernel"])
    if m.shared_expert_gate:
      shared = shared / (1 + np.exp(-(h_LxD @ p["shared_expert_gate"]["kernel"])))
    out += shared
  return out, logits


def _rope_inv_freq(h, cfg):
  """transformers' ROPE_INIT_FUNCTIONS in float64 (linear, llama3, yarn) and the cos/sin scale."""
  theta = cfg.rope_theta
  inv = 1.0 / theta ** (np.arange(0, h, 2) / h)
  r = getattr(cfg, "rope_scaling", None)
  kind = "none" if r is None else r.type
  if kind == "linear":
    return inv / r.factor, 1.0
  if kind == "llama3":
    old, lo, hi = r.original_max_position_embeddings, r.low_freq_factor, r.high_freq_factor
    wavelen = 2 * np.pi / inv
    smooth = (old / wavelen - lo) / (hi - lo)
    mid = (1 - smooth) * inv / r.factor + smooth * inv
    return np.where(wavelen > old / lo, inv / r.factor, np.where(wavelen < old / hi, inv, mid)), 1.0
  if kind == "yarn":
    dim_of = lambda rot: h * np.log(r.original_max_position_embeddings / (rot * 2 * np.pi)) / (2 * np.log(theta))
    low, high = dim_of(r.beta_fast), dim_of(r.beta_slow)
    if r.truncate:
      low, high = np.floor(low), np.ceil(high)
    low, high = max(low, 0), min(high, h - 1)
    ramp = np.clip((np.arange(h // 2) - low) / (high - low if high > low else 0.001), 0, 1)
    scale = r.attention_factor or (0.1 * np.log(r.factor) + 1.0 if r.factor > 1 else 1.0)
    return inv / r.factor * ramp + inv * (1 - ramp), scale
  return inv, 1.0


def reference_logits(params, cfg, ids_L, pos_L=None, router_logits=None):
  """Logits [L, V] of ONE unpacked document (plain causal mask). MoE layers (`moe` subtrees) run
  moe_reference; pass a list as `router_logits` to receive each sparse layer's [L, E] logits."""
  p = lambda tree: {k: (p(v) if isinstance(v, dict) else np.asarray(v, np.float64)) for k, v in tree.items()}
  params = p(params)
  n_len = len(ids_L)
  pos_L = np.arange(n_len) if pos_L is None else np.asarray(pos_L)
  x = params["embed"]["embedding"][np.asarray(ids_L)]
  group = cfg.n_heads // cfg.n_kv_heads
  causal = np.tril(np.ones((n_len, n_len), bool))
  for i in range(cfg.n_layers):
    lp = params[f"layers_{i}"]
    a = lp["attn"]
    h = _rms(x, lp["attn_norm"]["scale"], cfg.rms_eps)
    q = np.einsum("ld,dnh->lnh", h, a["q_proj"]["kernel"])
    k = np.einsum("ld,dnh->lnh", h, a["k_proj"]["kernel"])
    v = np.einsum("ld,dnh->lnh", h, a["v_proj"]["kernel"])
    if cfg.qkv_bias:
      q, k, v = q + a["q_proj"]["bias"], k + a["k_proj"]["bias"], v + a["v_proj"]["bias"]
    if cfg.qk_norm:
      q, k = _rms(q, a["q_norm"]["scale"], cfg.rms_eps), _rms(k, a["k_norm"]["scale"], cfg.rms_eps)
    q, k = _rope(q, pos_L, cfg), _rope(k, pos_L, cfg)
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # HF repeat_kv
    s = np.einsum("qnh,knh->nqk", q, k) / np.sqrt(cfg.head_dim)
    s = np.where(causal[None], s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("nqk,knh->qnh", w, v)
    x = x + np.einsum("qnh,nhd->qd", o, a["o_proj"]["kernel"])
    h = _rms(x, lp["mlp_norm"]["scale"], cfg.rms_eps)
    if "moe" in lp:
      out, logits = moe_reference(h, lp["moe"], cfg)
      x = x + out
      if router_logits is not None:
        router_logits.append(logits)
      continue
    m = lp["mlp"]
    g = h @ m["gate_proj"]["kernel"]
    u = h @ m["up_proj"]["kernel"]
    x = x + (g / (1 + np.exp(-g)) * u) @ m["down_proj"]["kernel"]
  x = _rms(x, params["final_norm"]["scale"], cfg.rms_eps)
  head = params["embed"]["embedding"].T if cfg.tie_embeddings else params["lm_head"]["kernel"]
  return x @ head


def random_params(cfg, seed=0, std=None):
  """A parameter tree of the decoder's exact structure filled from numpy (no jitted init: compiling
  the PRNG for every parameter costs seconds on CPU, and these tests only need some weights)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from llm_jax.model.decoder import Decoder

  ids = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda r: nn.unbox(Decoder(cfg).init(r, ids, ids, ids + 1)["params"]),
                          jax.random.key(0))
  rng = np.random.default_rng(seed)
  std = cfg.init_std if std is None else std
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray((std * rng.standard_normal(s.shape)).astype(s.dtype)), shapes)
