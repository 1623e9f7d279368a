"""Hugging Face config.json <-> llm_jax model config, for the Llama, Qwen2 and Qwen3 families.

Import accepts only what our decoder computes exactly; anything else (scaled RoPE, sliding
windows, experts, biases we do not have) is refused with the config.json field that caused it,
because a silently different model is worse than no model.
"""

from typing import Any

from llm_jax.model.config import ModelConfig

# model_type -> the transformers class that loads it without custom code.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# Parameter dtype names as transformers writes them in `torch_dtype` / `dtype`.
_HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _reject(source: str, field: str, value: Any, why: str):
  raise ValueError(f"{source}: field {field!r} = {value!r}: {why}; llm_jax cannot import this model")


def _rope_theta(hf: dict[str, Any], source: str) -> float:
  """Reads the RoPE base from the v4 layout (rope_theta, rope_scaling) or the v5 layout
  (rope_parameters), refusing any scaled variant (llama3, yarn, linear, dynamic, ...)."""
  theta = hf.get("rope_theta")
  for field in ("rope_scaling", "rope_parameters"):
    params = hf.get(field)
    if not params:
      continue
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
      _reject(source, field, params, "per-layer RoPE parameters are not supported")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
      _reject(source, f"{field}.rope_type", kind,
              "only unscaled RoPE ('default') is supported (no llama3/yarn/linear/dynamic scaling)")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
      _reject(source, f"{field}.partial_rotary_factor", params["partial_rotary_factor"],
              "RoPE must rotate the whole head")
    theta = params.get("rope_theta", theta)
  if hf.get("partial_rotary_factor", 1.0) != 1.0:
    _reject(source, "partial_rotary_factor", hf["partial_rotary_factor"], "RoPE must rotate the whole head")
  return float(theta if theta is not None else 10000.0)


def model_fields_from_hf(hf: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
  """config.json (as a dict) -> the `config.model` fields of llm_jax (configs/models.py names).

  `source` names the file in error messages. Does not set dtypes (the importer decides them).
  """
  model_type = hf.get("model_type")
  if model_type not in ARCHITECTURES:
    _reject(source, "model_type", model_type, f"supported families are {sorted(ARCHITECTURES)}")
  if hf.get("hidden_act", "silu") != "silu":
    _reject(source, "hidden_act", hf["hidden_act"], "the MLP must be SwiGLU with 'silu'")
  for field in ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size"):
    if hf.get(field):
      _reject(source, field, hf[field], "mixture-of-experts layers are not supported")
  if hf.get("quantization_config"):
    _reject(source, "quantization_config", "...", "quantized checkpoints are not supported")
  if hf.get("use_sliding_window"):
    _reject(source, "use_sliding_window", True, "sliding-window attention is not supported")
  layer_types = hf.get("layer_types") or []
  if any(t != "full_attention" for t in layer_types):
    _reject(source, "layer_types", sorted(set(layer_types)), "every layer must be 'full_attention'")
  if hf.get("mlp_bias"):
    _reject(source, "mlp_bias", True, "MLP projections have no bias in llm_jax")
  if model_type in ("llama", "qwen3") and hf.get("attention_bias"):
    # transformers puts this bias on q, k, v *and* o_proj; our o_proj has none.
    _reject(source, "attention_bias", True, "a bias on o_proj is not supported")

  dim = int(hf["hidden_size"])
  n_heads = int(hf["num_attention_heads"])
  return dict(
      vocab_size=int(hf["vocab_size"]),
      dim=dim,
      n_layers=int(hf["num_hidden_layers"]),
      n_heads=n_heads,
      n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
      head_dim=int(hf.get("head_dim") or dim // n_heads),
      mlp_dim=int(hf["intermediate_size"]),
      rope_theta=_rope_theta(hf, source),
      rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
      qkv_bias=model_type == "qwen2",  # Qwen2 always has q/k/v bias (and never o_proj bias)
      qk_norm=model_type == "qwen3",
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
  )


def hf_dtype(hf: dict[str, Any]) -> str | None:
  """The checkpoint's declared parameter dtype, as an llm_jax dtype name (None if unknown)."""
  return _HF_DTYPES.get(str(hf.get("dtype") or hf.get("torch_dtype") or ""))


def family(cfg: ModelConfig) -> str:
  """The transformers model_type that computes exactly what `cfg` computes."""
  if cfg.qkv_bias and cfg.qk_norm:
    raise ValueError("config.model has both qkv_bias and qk_norm: no transformers class without "
                     "custom code has both (Qwen2 has the bias, Qwen3 the norm)")
  return "qwen2" if cfg.qkv_bias else "qwen3" if cfg.qk_norm else "llama"


def hf_config_from_model(cfg: ModelConfig, *, dtype: str, max_position_embeddings: int,
                         bos_id: int | None, eos_id: int | None, pad_id: int | None
                         ) -> dict[str, Any]:
  """ModelConfig -> a config.json that transformers' Auto classes load with no custom code.

  RoPE is written in both the v4 (`rope_theta`) and the v5 (`rope_parameters`) layout.
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
      "rope_scaling": None,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
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
    if model_type == "qwen3":
      hf.update(attention_bias=False)
  return hf
