"""The decoder model (layer L1: imports nothing of llm_jax but the foundations).

  config.py         ModelConfig, MoEConfig, RopeScaling: the hyper-parameters and their defaults
  decoder.py        the Llama / Qwen2 / Qwen3 decoder in flax.linen, the KV cache
  layers.py         RMSNorm, the logically partitioned projection, RoPE, SwiGLU
  attention.py      grouped-query attention over packed documents and a KV cache
  cpu_attention.py  flash attention's math with XLA matmuls, for training on a CPU
  cpu.py            program shapes XLA's CPU backend runs fast
  kernels/          Pallas attention: splash (TPU), Triton flash attention (GPU), their dispatch
  moe.py, gmm.py    mixture-of-experts MLPs and their grouped matmul
  lora.py           LoRA adapters in their own variable collection; merging
  precision.py      float32 results with compute-dtype gradients
  init.py           abstract shapes, shardings and the sharded init of params or adapters
  flops.py          parameter counts and FLOPs per token
  bench_matmul.py   `python -m llm_jax.model.bench_matmul`: the CPU step's matmuls, XLA vs torch

Shape suffixes, one legend for the whole package (`logits_BxLxV`, `k_BxSxKxH`):
  B batch rows        L query / sequence length   S key or cache length   D model width
  N query heads       K key/value heads           H head size             G query heads per K
  F MLP hidden width  V vocabulary                E experts               C chunk length
  T tokens flattened over batch and length (moe.py: T x top_k assignments)
gmm.py uses the matmul convention instead (lhs M x K times rhs K x N) and moe.py's K is top_k;
each says so in its docstring.
"""
