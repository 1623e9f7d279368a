"""The transformers side of `python -m llm_jax.infer.bench --compare_torch`: decode speed of the
same weights in llm_jax and in transformers, on the same machine, in one run.

A random transformers model (torch, float32) is built and saved, then imported with hf_import, so
both sides hold the same weights; greedy generation is timed on both with the same definitions
(infer/measure.py's measure_llm_jax, and a token-stamping streamer for transformers here): time to
first token (prefill + one token) and decode throughput (tokens/s after the first).
Needs torch and transformers (tests/requirements.txt).
"""

import os
import time

import numpy as np

FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


def build_hf(family: str, dim: int, n_layers: int, vocab: int, out_dir: str):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  config_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[family])
  config = config_cls(vocab_size=vocab, hidden_size=dim, intermediate_size=dim * 8 // 3 // 64 * 64,
                      num_hidden_layers=n_layers, num_attention_heads=dim // 64,
                      num_key_value_heads=max(1, dim // 256), head_dim=64, rope_theta=1e6,
                      tie_word_embeddings=True, max_position_embeddings=4096)
  model = model_cls(config).eval()
  model.generation_config.eos_token_id = None  # both sides generate every requested token
  model.generation_config.pad_token_id = 0
  model.save_pretrained(out_dir)
  from tokenizers import Tokenizer, models  # pylint: disable=g-import-not-at-top
  Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0")).save(
      os.path.join(out_dir, "tokenizer.json"))
  return model


def measure_transformers(model, vocab: int, *, batch_sizes=(1, 8), prompt_len: int = 64,
                         new_tokens: int = 128, seed: int = 0, warmup: bool = True) -> list[dict]:
  """The same figures as llm_jax.infer.measure.measure_llm_jax, for transformers' greedy generate:
  a streamer stamps the host time of every generated token."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers.generation.streamers import BaseStreamer  # pylint: disable=g-import-not-at-top

  class Stamps(BaseStreamer):
    def __init__(self):
      self.times = []

    def put(self, value):  # called with the prompt first, then with each new token
      self.times.append(time.perf_counter())

    def end(self):
      pass

  rng = np.random.default_rng(seed)
  results = []
  for batch in batch_sizes:
    ids = torch.tensor(rng.integers(0, vocab, (batch, prompt_len)))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, do_sample=False)
    with torch.no_grad():
      if warmup:
        model.generate(ids, **kw)
      stamps = Stamps()
      start = time.perf_counter()
      model.generate(ids, streamer=stamps, **kw)
      total = time.perf_counter() - start
    t = stamps.times[1:]
    results.append({"batch": batch, "ttft_s": t[0] - start, "total_s": total,
                    "decode_tokens_per_s": batch * (len(t) - 1) / max(t[-1] - t[0], 1e-9)})
  return results


def medians(runs: list[list[dict]]) -> list[dict]:
  """Per batch size, the median of each figure over the runs."""
  return [{k: (float(np.median([run[i][k] for run in runs])) if k != "batch" else runs[0][i][k])
           for k in runs[0][i]} for i in range(len(runs[0]))]
