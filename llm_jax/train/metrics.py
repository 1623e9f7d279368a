"""What a user reads while training: throughput, MFU and the console line (writers.py sends them).

MFU = model FLOPs per second / peak FLOPs of the devices in use (devices.peak_flops: dense bf16
figures from vendor spec sheets; on CPU, measured once per machine with a matmul in the model's
compute dtype, so MFU there reads as "share of what this CPU's XLA matmul reaches").
"""

import time

import jax
import numpy as np

from llm_jax import console, devices

class Throughput:
  """Tokens/s and MFU over the steps since the last report."""

  def __init__(self, tokens_per_step: int, flops_per_token: float, compute_dtype: str):
    self.tokens_per_step = tokens_per_step
    self.flops_per_step = flops_per_token * tokens_per_step
    self.peak, self.peak_source = devices.peak_flops(compute_dtype)
    self._t = time.perf_counter()
    self._step = None

  def start(self, step: int):
    self._t, self._step = time.perf_counter(), step

  def report(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps = step - self._step
    dt = (now - self._t) / max(steps, 1)
    self._t, self._step = now, step
    return {
        "step_time_s": dt,
        "tokens_per_s": self.tokens_per_step / dt,
        "mfu": self.flops_per_step / dt / self.peak,
    }


_FORMATS = {"loss": "loss {:.4f}", "accuracy": "accuracy {:.3f}",
            # DPO (TRL's names) and distillation
            "rewards/accuracies": "rewards/accuracies {:.3f}",
            "rewards/margins": "rewards/margins {:.4f}", "rewards/chosen": "rewards/chosen {:.4f}",
            "rewards/rejected": "rewards/rejected {:.4f}", "logps/chosen": "logps/chosen {:.2f}",
            "logps/rejected": "logps/rejected {:.2f}", "ce": "ce {:.4f}", "kl": "kl {:.4f}",
            # online RL (TRL's GRPO names)
            "reward": "reward {:.3f}", "reward_std": "reward_std {:.3f}",
            "frac_reward_zero_std": "zero-std groups {:.0%}", "entropy": "entropy {:.3f}",
            "completions/mean_length": "length {:.1f}",
            "completions/clipped_ratio": "clipped {:.0%}",
            "clip_ratio/region_mean": "ratio clipped {:.1%}",
            "rollout_tokens_per_s": "rollout {:,.0f} tokens/s",
            "train_tokens_per_s": "train {:,.0f} tokens/s",
            "learning_rate": "lr {:.3g}",
            "grad_norm": "grad_norm {:.3f}", "tokens_per_s": "{:,.0f} tokens/s",
            "mfu": "MFU {:.1%}", "step_time_s": "{:.3f} s/step", "padding_share": "padding {:.1%}",
            "moe_aux_loss": "moe aux {:.3f}", "moe_load_max": "expert load max/mean {:.2f}",
            "moe_dropped_share": "dropped {:.1%}"}


def format_line(step: int, total: int, scalars: dict[str, float]) -> str:
  """"step 120/300 | loss ... | 0.432 s/step | ... | ETA 1 min 18 s": the ETA is the steps left
  times the recent s/step (the steps since the last line, so a slow start or an eval does not
  skew it); there is none on the last step."""
  parts = [f"step {step}/{total}"]
  parts += [fmt.format(scalars[k]) for k, fmt in _FORMATS.items() if k in scalars]
  if step < total and scalars.get("step_time_s"):
    parts.append(f"ETA {console.duration((total - step) * scalars['step_time_s'])}")
  return " | ".join(parts)


def format_eval_line(step: int, scalars: dict[str, float]) -> str:
  """"eval at step N: loss ... | ..." for any objective's eval metrics (keys "eval_<name>")."""
  plain = {k[len("eval_"):]: v for k, v in scalars.items() if k.startswith("eval_")}
  parts = [fmt.format(plain[k]) for k, fmt in _FORMATS.items() if k in plain]
  if "perplexity" in plain:
    parts.append(f"perplexity {plain['perplexity']:.2f}")
  count = next(((k, plain[k]) for k in ("pairs", "trained_tokens") if k in plain), None)
  tail = f" ({count[1]:,.0f} {count[0].replace('trained_', '')})" if count else ""
  return f"eval at step {step}: " + " | ".join(parts) + tail


def scored(tokens: float, documents: float | None = None, batches: float | None = None) -> str:
  """"8 batches, 336 documents, 10,318 tokens": what an eval loss was computed over (the training
  log's eval and the eval job's loss task say it alike, so two losses can be told apart)."""
  parts = [f"{batches:,.0f} batches"] if batches is not None else []
  parts += [f"{documents:,.0f} documents"] if documents is not None else []
  return ", ".join(parts + [f"{tokens:,.0f} tokens"])


def format_lm_eval_line(step: int, scalars: dict[str, float]) -> str:
  """"eval at step N: loss ... | perplexity ... | accuracy ... (8 batches, 336 documents, ...)"."""
  return (f"eval at step {step}: loss {scalars['eval_loss']:.4f} | perplexity "
          f"{scalars['eval_perplexity']:.2f} | accuracy {scalars['eval_accuracy']:.3f} ("
          + scored(scalars.get("eval_tokens", 0), scalars.get("eval_documents"),
                   scalars.get("eval_batches")) + ")")


def to_host(metrics) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


def flat_hparams(config) -> dict:
  """config as {"train.lr": 3e-3, ...} with the scalar fields TensorBoard's HParams tab shows."""
  out = {}

  def walk(prefix, d):
    for k, v in d.items():
      if hasattr(v, "items"):
        walk(f"{prefix}{k}.", v)
      elif isinstance(v, (bool, int, float, str)):
        out[f"{prefix}{k}"] = v
  walk("", config)
  return out
