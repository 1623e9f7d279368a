"""Hugging Face config.json <-> llm_jax model config, for the Llama, Qwen2, Qwen3, Qwen2-MoE and
Qwen3-MoE families, with RoPE scaled the linear, llama3 (Llama 3.1 / 3.2) or yarn way.

Import accepts only what our decoder computes exactly; anything else (dynamic / longrope RoPE,
sliding windows, MoE layouts other than Qwen's, biases we do not have) is refused with the
config.json field that caused it, because a silently different model is worse than no model.
"""

from typing import Any

from llm_jax.model.config import ModelConfig

# model_type -> the transformers class that loads it without custom code.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
MOE_FAMILIES = ("qwen2_moe", "qwen3_moe")
SCALED_ROPE_TYPES = ("linear", "llama3", "yarn")
# Parameter dtype names as transformers writes them in `torch_dtype` / `dtype`.
_HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _reject(source: str, field: str, value: Any, why: str):
  raise ValueError(f"{source}: field {field!r} = {value!r}: {why}; llm_jax cannot import this model")


def _rope(hf: dict[str, Any], source: str) -> tuple[float, dict[str, Any]]:
  """(rope_theta, config.model.rope_scaling fields) from the v4 layout (rope_theta, rope_scaling)
  or the v5 layout (rope_parameters). rope_scaling wins over rope_parameters, as in transformers.
  Scaling other than linear / llama3 / yarn (dynamic, longrope, ...) is refused."""
  for field in ("rope_scaling", "rope_parameters"):
    params = hf.get(field)
    if params and (not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values())):
      _reject(source, field, params, "per-layer RoPE parameters are not supported")
  rope_parameters = hf.get("rope_parameters") or {}
  theta = rope_parameters.get("rope_theta", hf.get("rope_theta"))
  field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  params = hf.get(field) or {}
  theta = params.get("rope_theta", theta)
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    _reject(source, f"{field}.partial_rotary_factor", params["partial_rotary_factor"],
            "RoPE must rotate the whole head")
  if hf.get("partial_rotary_factor", 1.0) != 1.0:
    _reject(source, "partial_rotary_factor", hf["partial_rotary_factor"], "RoPE must rotate the whole head")
  theta = float(theta if theta is not None else 10000.0)
  kind = params.get("rope_type", params.get("type", "default"))
  if kind == "default":
    return theta, {"type": "none"}
  if kind not in SCALED_ROPE_TYPES:
    _reject(source, f"{field}.rope_type", kind,
            f"supported RoPE types are 'default' and {list(SCALED_ROPE_TYPES)} (not dynamic/longrope)")
  # transformers' standardize_rope_params: the pretraining length defaults to these.
  orig = params.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings") \
      or hf.get("max_position_embeddings") or 0
  factor = params.get("factor")
  if factor is None and kind == "yarn" and orig:
    factor = hf.get("max_position_embeddings", orig) / orig
  if factor is None:
    _reject(source, f"{field}.factor", None, f"rope_type {kind!r} needs a factor")
  out = {"type": kind, "factor": float(factor)}
  if kind == "llama3":
    out.update(original_max_position_embeddings=int(orig),
               low_freq_factor=float(params["low_freq_factor"]),
               high_freq_factor=float(params["high_freq_factor"]))
  elif kind == "yarn":
    out.update(original_max_position_embeddings=int(orig),
               beta_fast=float(params.get("beta_fast") or 32.0),
               beta_slow=float(params.get("beta_slow") or 1.0),
               attention_factor=float(params.get("attention_factor") or 0.0),
               mscale=float(params.get("mscale") or 0.0),
               mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
               truncate=bool(params.get("truncate", True)))
  return theta, out


def _moe_fields(hf: dict[str, Any], model_type: str, source: str, n_layers: int) -> dict[str, Any]:
  """config.model.moe of a Qwen2-MoE / Qwen3-MoE config.json."""
  if hf.get("mlp_only_layers"):
    _reject(source, "mlp_only_layers", hf["mlp_only_layers"],
            "dense layers must be every decoder_sparse_step-th (leave mlp_only_layers empty)")
  # transformers 5 writes num_local_experts (an alias); Hub checkpoints have num_experts.
  n_experts = int(hf.get("num_experts") or hf["num_local_experts"])
  top_k = int(hf["num_experts_per_tok"])
  every = int(hf.get("decoder_sparse_step") or 1)
  n_sparse = sum((i + 1) % every == 0 for i in range(n_layers))
  shared = int(hf.get("shared_expert_intermediate_size") or 0) if model_type == "qwen2_moe" else 0
  return dict(
      n_experts=n_experts, top_k=top_k, expert_mlp_dim=int(hf["moe_intermediate_size"]),
      n_shared_experts=1 if shared else 0, shared_mlp_dim=shared, shared_expert_gate=bool(shared),
      every=every, norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
      # transformers adds coef * one f.P term over all layers whose f sums to top_k; ours adds a
      # per-layer term whose f sums to 1, so the same pull is coef * top_k / sparse layers each.
      aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)) * top_k / max(n_sparse, 1))


def model_fields_from_hf(hf: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
  """config.json (as a dict) -> the `config.model` fields of llm_jax (configs/models.py names).

  `source` names the file in error messages. Does not set dtypes (the importer decides them).
  """
  model_type = hf.get("model_type")
  if model_type not in ARCHITECTURES:
    _reject(source, "model_type", model_type, f"supported families are {sorted(ARCHITECTURES)}")
  if hf.get("hidden_act", "silu") != "silu":
    _reject(source, "hidden_act", hf["hidden_act"], "the MLP must be SwiGLU with 'silu'")
  moe = model_type in MOE_FAMILIES
  for field in ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size"):
    if hf.get(field) and not moe:
      _reject(source, field, hf[field], f"mixture-of-experts layers in a {model_type!r} model are not "
              f"supported (the MoE families are {list(MOE_FAMILIES)})")
  if hf.get("quantization_config"):
    _reject(source, "quantization_config", "...", "quantized checkpoints are not supported")
  if hf.get("use_sliding_window"):
    _reject(source, "use_sliding_window", True, "sliding-window attention is not supported")
  layer_types = hf.get("layer_types") or []
  if any(t != "full_attention" for t in layer_types):
    _reject(source, "layer_types", sorted(set(layer_types)), "every layer must be 'full_attention'")
  if hf.get("mlp_bias"):
    _reject(source, "mlp_bias", True, "MLP projections have no bias in llm_jax")
  if model_type in ("llama", "qwen3", "qwen3_moe") and hf.get("attention_bias"):
    # transformers puts this bias on q, k, v *and* o_proj; our o_proj has none.
    _reject(source, "attention_bias", True, "a bias on o_proj is not supported")

  dim = int(hf["hidden_size"])
  n_heads = int(hf["num_attention_heads"])
  n_layers = int(hf["num_hidden_layers"])
  theta, rope_scaling = _rope(hf, source)
  fields = dict(
      vocab_size=int(hf["vocab_size"]),
      dim=dim,
      n_layers=n_layers,
      n_heads=n_heads,
      n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
      head_dim=int(hf.get("head_dim") or dim // n_heads),
      mlp_dim=int(hf["intermediate_size"]),
      rope_theta=theta,
      rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
      qkv_bias=model_type == "qwen2",  # Qwen2 always has q/k/v bias (and never o_proj bias)
      qk_norm=model_type in ("qwen3", "qwen3_moe"),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      rope_scaling=rope_scaling,
  )
  if model_type == "qwen2_moe":
    fields["qkv_bias"] = bool(hf.get("qkv_bias", True))  # Qwen1.5-MoE / Qwen2-MoE have it
  if moe:
    fields["moe"] = _moe_fields(hf, model_type, source, n_layers)
  return fields


def hf_dtype(hf: dict[str, Any]) -> str | None:
  """The checkpoint's declared parameter dtype, as an llm_jax dtype name (None if unknown)."""
  return _HF_DTYPES.get(str(hf.get("dtype") or hf.get("torch_dtype") or ""))


def family(cfg: ModelConfig) -> str:
  """The transformers model_type that computes exactly what `cfg` computes."""
  if cfg.qkv_bias and cfg.qk_norm:
    raise ValueError("config.model has both qkv_bias and qk_norm: no transformers class without "
                     "custom code has both (Qwen2 has the bias, Qwen3 the norm)")
  if cfg.moe.enabled:
    if cfg.qk_norm:
      if cfg.moe.n_shared_experts:
        raise ValueError("config.model.moe.n_shared_experts > 0 with qk_norm: Qwen3-MoE has no shared "
                         "experts and Qwen2-MoE no q/k norm; no transformers class computes this model")
      return "qwen3_moe"
    if not cfg.moe.n_shared_experts:
      raise ValueError("config.model.moe without shared experts and without qk_norm: export needs "
                       "Qwen3-MoE's q/k norm (qk_norm=True) or Qwen2-MoE's shared expert "
                       "(n_shared_experts >= 1)")
    return "qwen2_moe"
  return "qwen2" if cfg.qkv_bias else "qwen3" if cfg.qk_norm else "llama"


def rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
  """transformers' rope_parameters dict of `cfg` (rope_type "default" when unscaled)."""
  r = cfg.rope_scaling
  if r.type == "none":
    return {"rope_type": "default", "rope_theta": cfg.rope_theta}
  out = {"rope_type": r.type, "rope_theta": cfg.rope_theta, "factor": r.factor}
  if r.type == "llama3":
    out.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor,
               original_max_position_embeddings=r.original_max_position_embeddings)
  elif r.type == "yarn":
    out.update(original_max_position_embeddings=r.original_max_position_embeddings,
               beta_fast=r.beta_fast, beta_slow=r.beta_slow, truncate=r.truncate)
    for k in ("attention_factor", "mscale", "mscale_all_dim"):
      if getattr(r, k):
        out[k] = getattr(r, k)
  return out


def hf_config_from_model(cfg: ModelConfig, *, dtype: str, max_position_embeddings: int,
                         bos_id: int | None, eos_id: int | None, pad_id: int | None
                         ) -> dict[str, Any]:
  """ModelConfig -> a config.json that transformers' Auto classes load with no custom code.

  RoPE is written in both the v4 (`rope_theta`, `rope_scaling`) and the v5 (`rope_parameters`)
  layout.
  """
  model_type = family(cfg)
  hf = {
      "architectures": [ARCHITECTURES[model_type]],
      "model_type": model_type,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.dim,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": max_position_embeddings,
      "rms_norm_eps": cfg.rms_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": None if cfg.rope_scaling.type == "none" else rope_parameters(cfg),
      "rope_parameters": rope_parameters(cfg),
      "tie_word_embeddings": cfg.tie_embeddings,
      "attention_dropout": 0.0,
      "initializer_range": cfg.init_std,
      "use_cache": True,
      "torch_dtype": dtype,
      "dtype": dtype,
      "bos_token_id": bos_id,
      "eos_token_id": eos_id,
      "pad_token_id": pad_id,
  }
  if model_type == "llama":
    hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
  else:
    hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers,
              layer_types=["full_attention"] * cfg.n_layers)
    if model_type in ("qwen3", "qwen3_moe"):
      hf.update(attention_bias=False)
  if cfg.moe.enabled:
    m = cfg.moe
    hf.update(num_experts=m.n_experts, num_experts_per_tok=m.top_k,
              moe_intermediate_size=cfg.expert_mlp_dim, decoder_sparse_step=m.every,
              mlp_only_layers=[], norm_topk_prob=m.norm_topk_prob, output_router_logits=False,
              router_aux_loss_coef=m.aux_loss_coef * cfg.n_sparse_layers / m.top_k)
    if model_type == "qwen2_moe":
      hf.update(shared_expert_intermediate_size=cfg.shared_mlp_dim, qkv_bias=cfg.qkv_bias)
  return hf
