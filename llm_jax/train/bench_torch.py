"""The PyTorch side of `python -m llm_jax.train.bench --compare_torch`: the same train step in transformers.

A `LlamaForCausalLM` (Qwen2 with q/k/v biases, Qwen3 with q/k norms) of the benchmarked shape in
float32 with transformers' default attention (SDPA), trained the way a PyTorch user would: AdamW
with the run's betas, epsilon and weight decay (not on norms and embeddings, as llm_jax), the
gradient clipped to the same global norm, and next-token cross-entropy over the same tokens.
The batch's rows are attended causally as whole rows (the usual PyTorch setup); llm_jax also
keeps the packed documents apart, which costs it a little more.

Needs torch and transformers (tests/requirements.txt); `unavailable()` says why not.
"""

import time

import numpy as np

from llm_jax.model.config import ModelConfig


def unavailable() -> str | None:
  """None when the PyTorch side can run, else the reason."""
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    import transformers  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    return f"{e.name} is not installed (pip install -r tests/requirements.txt)"
  return None


def _hf_model(cfg: ModelConfig):
  import transformers  # pylint: disable=g-import-not-at-top
  family = "Qwen3" if cfg.qk_norm else ("Qwen2" if cfg.qkv_bias else "Llama")
  config = getattr(transformers, f"{family}Config")(
      vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
      num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
      rms_norm_eps=cfg.rms_eps, tie_word_embeddings=cfg.tie_embeddings,
      max_position_embeddings=4096, initializer_range=cfg.init_std)
  return getattr(transformers, f"{family}ForCausalLM")(config).train()


class TorchTrainStep:
  """`step()` runs one forward + backward + optimizer step on the fixed batch; returns the loss."""

  def __init__(self, cfg: ModelConfig, train_cfg, batch: dict, seed: int = 0):
    import torch  # pylint: disable=g-import-not-at-top
    torch.manual_seed(seed)
    self.torch = torch
    self.model = _hf_model(cfg)
    decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in self.model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    self.optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train_cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=train_cfg.lr, betas=(train_cfg.b1, train_cfg.b2), eps=train_cfg.eps)
    self.grad_clip = train_cfg.grad_clip
    self.inputs = torch.from_numpy(np.asarray(batch["inputs"], np.int64))
    self.targets = torch.from_numpy(np.asarray(batch["targets"], np.int64))
    self.vocab = cfg.vocab_size

  def step(self) -> float:
    torch = self.torch
    logits = self.model(input_ids=self.inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, self.vocab), self.targets.reshape(-1))
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if self.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
    self.optimizer.step()
    return float(loss.detach())

  def timed(self, steps: int) -> list[float]:
    """Seconds of each of `steps` steps."""
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      self.step()
      times.append(time.perf_counter() - t)
    return times

  def threads(self) -> int:
    return self.torch.get_num_threads()
