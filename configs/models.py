"""Named model presets. Pick one with `config.model = models.get("name")` in a config file,
or `--config.model.<field>=...` on the command line."""

import ml_collections


def _model(**kw) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.vocab_size = 0  # 0: take the tokenizer's vocabulary size
  c.dim = 128  # hidden size (d_model)
  c.n_layers = 4  # decoder blocks
  c.n_heads = 4  # query heads
  c.n_kv_heads = 2  # key/value heads (grouped-query attention; = n_heads for MHA)
  c.head_dim = 0  # per-head size; 0 means dim // n_heads
  c.mlp_dim = 384  # SwiGLU intermediate size
  c.rope_theta = 10000.0  # rotary embedding base
  c.rms_eps = 1e-6  # RMSNorm epsilon
  c.qkv_bias = False  # bias on q/k/v projections (Qwen2)
  c.qk_norm = False  # RMSNorm on per-head q and k (Qwen3)
  c.tie_embeddings = True  # output projection shares the input embedding
  c.dtype = "float32"  # compute dtype: float32 on CPU, bfloat16 on GPU/TPU
  c.param_dtype = "float32"  # parameter (and optimizer state) dtype
  c.scan_layers = True  # stack layers under nn.scan: one compiled block, faster compiles
  c.remat_policy = "none"  # activation recompute: none | full | dots | dots_with_no_batch_dims | save_attn_out
  c.attention = "auto"  # attention kernel: auto (splash on TPU, pallas_gpu on GPU, else xla) | xla | splash | pallas_gpu | cudnn (dense mask, bf16)
  c.attention_block_q = 0  # fused-kernel query tile, forward; 0 = kernel default (splash 512, pallas_gpu 128)
  c.attention_block_kv = 0  # fused-kernel key/value tile, forward; 0 = kernel default (splash 512, pallas_gpu 128)
  c.attention_block_q_bwd = 0  # query tile of the backward pass; 0 = kernel default (splash 512, pallas_gpu 32)
  c.attention_block_kv_bwd = 0  # key/value tile of the backward pass; 0 = kernel default (splash 512, pallas_gpu 32)
  c.attention_interpret = False  # run the Pallas kernels in interpret mode on any device (slow; tests, debugging)
  c.loss_chunk_len = 0  # > 0: cross-entropy this many positions at a time; the [B, L, V] logits never exist (big vocabularies)
  c.init_std = 0.02  # stddev of the normal initialiser

  c.rope_scaling = ml_collections.ConfigDict()  # scaled RoPE (transformers' rope_scaling / rope_parameters)
  c.rope_scaling.type = "none"  # none | linear | llama3 (Llama 3.1/3.2) | yarn
  c.rope_scaling.factor = 1.0  # context extension factor (linear, llama3, yarn)
  c.rope_scaling.original_max_position_embeddings = 0  # llama3 / yarn: the pretraining context length
  c.rope_scaling.low_freq_factor = 1.0  # llama3: wavelengths above original / this are interpolated
  c.rope_scaling.high_freq_factor = 4.0  # llama3: wavelengths below original / this are kept
  c.rope_scaling.beta_fast = 32.0  # yarn: rotations where extrapolation ends
  c.rope_scaling.beta_slow = 1.0  # yarn: rotations where interpolation starts
  c.rope_scaling.attention_factor = 0.0  # yarn: scale of cos/sin; 0 = 0.1 ln(factor) + 1 (or from mscale)
  c.rope_scaling.mscale = 0.0  # yarn (DeepSeek): attention factor numerator scale; 0 = unused
  c.rope_scaling.mscale_all_dim = 0.0  # yarn (DeepSeek): attention factor denominator scale; 0 = unused
  c.rope_scaling.truncate = True  # yarn: round the correction range to whole dimensions

  c.moe = ml_collections.ConfigDict()  # mixture-of-experts MLPs (see llm_jax/model/moe.py)
  c.moe.n_experts = 0  # routed experts per sparse layer; 0 = dense model
  c.moe.top_k = 2  # experts each token is sent to
  c.moe.expert_mlp_dim = 0  # SwiGLU hidden size of one expert; 0 = mlp_dim
  c.moe.n_shared_experts = 0  # experts every token goes through (DeepSeek / minimind / Qwen2-MoE)
  c.moe.shared_mlp_dim = 0  # hidden size of one shared expert; 0 = expert_mlp_dim
  c.moe.shared_expert_gate = False  # Qwen2-MoE: scale shared experts by sigmoid(x @ w)
  c.moe.every = 1  # layer i is sparse when (i + 1) % every == 0; 1 = every layer (HF decoder_sparse_step)
  c.moe.norm_topk_prob = True  # renormalise the top-k router probabilities to sum 1 (Qwen3-MoE)
  c.moe.aux_loss_coef = 0.01  # Switch load-balancing loss weight per sparse layer (added to the loss)
  c.moe.z_loss_coef = 0.0  # router z-loss weight per sparse layer (ST-MoE uses 1e-3)
  c.moe.capacity_factor = 0.0  # 0 = dropless; > 0: each expert takes <= factor * tokens * top_k / E slots
  c.moe.gmm = "auto"  # grouped matmul: auto (tiled on CPU, ragged_dot on GPU/TPU) | ragged_dot | tiled
  c.moe.gmm_tile = 0  # rows per tile of the tiled grouped matmul; 0 = about the mean rows per expert
  c.update(kw)
  return c


PRESETS = {
    # A few hundred thousand parameters: trains in minutes on a 2-core laptop CPU.
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=384),
    # minimind's 26M shape.
    "minimind-26m": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, mlp_dim=1408,
                         rope_theta=1e6, rms_eps=1e-5, tie_embeddings=True),
    # minimind's MoE model (MiniMind2 with use_moe): the 26M shape with 4 routed experts (top 2)
    # and 1 shared expert per layer, each of the dense MLP's size.
    "minimind-moe": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, mlp_dim=1408,
                         rope_theta=1e6, rms_eps=1e-5, tie_embeddings=True,
                         moe=dict(n_experts=4, top_k=2, n_shared_experts=1, norm_topk_prob=True)),
    # Qwen2-0.5B's shape (vocab comes from the tokenizer: 151,936 for Qwen's own).
    "qwen2-0.5b": dict(dim=896, n_layers=24, n_heads=14, n_kv_heads=2, mlp_dim=4864,
                       rope_theta=1e6, rms_eps=1e-6, qkv_bias=True, tie_embeddings=True,
                       dtype="bfloat16"),
    # A Llama-3.2-1B-style shape.
    "llama-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, mlp_dim=8192,
                     rope_theta=5e5, rms_eps=1e-5, tie_embeddings=True, dtype="bfloat16"),
}


def get(name: str) -> ml_collections.ConfigDict:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return _model(**PRESETS[name])
