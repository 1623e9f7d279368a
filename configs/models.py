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
  c.update(kw)
  return c


PRESETS = {
    # A few hundred thousand parameters: trains in minutes on a 2-core laptop CPU.
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=384),
    # minimind's 26M shape.
    "minimind-26m": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, mlp_dim=1408,
                         rope_theta=1e6, rms_eps=1e-5, tie_embeddings=True),
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
