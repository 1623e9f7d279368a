"""Decode speed of the same weights in llm_jax and in transformers, on the same machine, in one run.

  python -m llm_jax.convert.bench_decode [--family=qwen2 --dim=512 --n_layers=8 --new_tokens=64]

Builds a random transformers model (torch, float32), saves it, imports it with hf_import, then
times greedy generation at batch 1 and batch 8 on both sides: time to first token (prompt
prefill + one token) and decode throughput (tokens/s after the first). Printed, not asserted.
Needs torch and transformers (tests/requirements.txt).
"""

import os
import tempfile
import time

from absl import app, flags
import numpy as np

from llm_jax.convert import hf_import
from llm_jax.infer.generate import Generator
from llm_jax.infer.sampling import SamplingConfig
from llm_jax.model.config import ModelConfig
from llm_jax.train import checkpoint

_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


def build_hf(family: str, dim: int, n_layers: int, vocab: int, out_dir: str):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  config_cls, model_cls = (getattr(transformers, n) for n in _CLASSES[family])
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


def time_it(fn, repeats: int = 2) -> float:
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def measure(generate_fn, batch: int, new_tokens: int) -> tuple[float, float]:
  """(seconds to first token, decode tokens/s) of generate_fn(batch, n_new)."""
  generate_fn(batch, 1)  # compile / warm up both lengths
  generate_fn(batch, new_tokens)
  ttft = time_it(lambda: generate_fn(batch, 1))
  total = time_it(lambda: generate_fn(batch, new_tokens))
  return ttft, batch * (new_tokens - 1) / max(total - ttft, 1e-9)


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  tmp = tempfile.mkdtemp(prefix="bench_decode_")
  hf_model = build_hf(f.family, f.dim, f.n_layers, f.vocab, os.path.join(tmp, "hf"))
  hf_import.import_hf(os.path.join(tmp, "hf"), os.path.join(tmp, "run"))
  params, config = checkpoint.load_params(os.path.join(tmp, "run"))
  cfg = ModelConfig.from_config(config.model)
  gen = Generator(params, cfg)
  prompt = np.random.default_rng(0).integers(1, f.vocab, f.prompt_len).tolist()

  def ours(batch, n):
    gen.generate([prompt] * batch, SamplingConfig(temperature=0.0, max_new_tokens=n))

  def theirs(batch, n):
    ids = torch.tensor([prompt] * batch)
    with torch.no_grad():
      hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                        min_new_tokens=n, do_sample=False)

  n_params = sum(p.numel() for p in hf_model.parameters())
  print(f"{f.family}: dim={f.dim} layers={f.n_layers} vocab={f.vocab} ({n_params / 1e6:.1f}M params, "
        f"float32), prompt {f.prompt_len} tokens, {f.new_tokens} new tokens, torch threads "
        f"{torch.get_num_threads()}, CPU")
  print(f"{'batch':>5} {'llm_jax TTFT':>13} {'HF TTFT':>9} {'llm_jax tok/s':>14} {'HF tok/s':>9} "
        f"{'speed ratio':>11}")
  for batch in (1, 8):
    ttft_j, tps_j = measure(ours, batch, f.new_tokens)
    ttft_h, tps_h = measure(theirs, batch, f.new_tokens)
    print(f"{batch:>5} {ttft_j * 1e3:>11.1f}ms {ttft_h * 1e3:>7.1f}ms {tps_j:>14.1f} {tps_h:>9.1f} "
          f"{tps_j / tps_h:>10.2f}x")


if __name__ == "__main__":
  flags.DEFINE_enum("family", "qwen2", sorted(_CLASSES), "transformers model family")
  flags.DEFINE_integer("dim", 512, "hidden size (heads of 64)")
  flags.DEFINE_integer("n_layers", 8, "decoder layers")
  flags.DEFINE_integer("vocab", 8192, "vocabulary size")
  flags.DEFINE_integer("prompt_len", 32, "prompt tokens")
  flags.DEFINE_integer("new_tokens", 64, "generated tokens per row")
  app.run(main)
