"""Decode speed of the same weights in llm_jax and in transformers, on the same machine, in one run.

  python -m llm_jax.convert.bench_decode [--family=qwen2 --dim=512 --n_layers=8 --vocab_size=8192
                                          --prompt_len=64 --new_tokens=128 --batch_sizes=1,8]

Builds a random transformers model (torch, float32), saves it, imports it with hf_import, then
times greedy generation at batch 1 and batch 8 on both sides with the same definitions
(llm_jax.infer.bench.measure_llm_jax, and a token-stamping streamer for transformers): time to
first token (prefill + one token) and decode throughput (tokens/s after the first). The two
sides alternate --repeats times and each figure is the median, so that a change in the machine's
load hits both alike. Printed, not asserted.
Needs torch and transformers (tests/requirements.txt).
"""

import os
import tempfile
import time

from absl import app, flags
import numpy as np

from llm_jax import console
from llm_jax.convert import hf_import
from llm_jax.infer import bench
from llm_jax.infer.generate import Generator
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


def measure_transformers(model, vocab: int, *, batch_sizes=(1, 8), prompt_len: int = 64,
                         new_tokens: int = 128, seed: int = 0, warmup: bool = True) -> list[dict]:
  """The same figures as llm_jax.infer.bench.measure_llm_jax, for transformers' greedy generate:
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


def _medians(runs: list[list[dict]]) -> list[dict]:
  """Per batch size, the median of each figure over the runs."""
  return [{k: (float(np.median([run[i][k] for run in runs])) if k != "batch" else runs[0][i][k])
           for k in runs[0][i]} for i in range(len(runs[0]))]


def main(argv):
  console.setup()
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:  # removed afterwards
    hf_model = build_hf(f.family, f.dim, f.n_layers, f.vocab_size, os.path.join(tmp, "hf"))
    hf_import.import_hf(os.path.join(tmp, "hf"), os.path.join(tmp, "run"))
    params, config = checkpoint.load_params(os.path.join(tmp, "run"))
  cfg = ModelConfig.from_config(config.model)
  kw = dict(batch_sizes=tuple(int(b) for b in f.batch_sizes), prompt_len=f.prompt_len, new_tokens=f.new_tokens)
  gen = Generator(params, cfg)
  ours_runs, theirs_runs = [], []
  for r in range(f.repeats):  # alternate the two sides
    ours_runs.append(bench.measure_llm_jax(params, cfg, generator=gen, warmup=r == 0, **kw))
    theirs_runs.append(measure_transformers(hf_model, f.vocab_size, warmup=r == 0, **kw))
  ours, theirs = _medians(ours_runs), _medians(theirs_runs)

  n_params = sum(p.numel() for p in hf_model.parameters())
  print(f"{f.family}: dim={f.dim} layers={f.n_layers} vocab={f.vocab_size} ({n_params / 1e6:.1f}M params, "
        f"float32), prompt {f.prompt_len} tokens, {f.new_tokens} new tokens, greedy, CPU "
        f"(torch threads {torch.get_num_threads()})")
  print(f"medians of {f.repeats} alternating runs per side; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  print(f"{'batch':>5} {'llm_jax TTFT':>13} {'HF TTFT':>9} {'llm_jax tok/s':>14} {'HF tok/s':>9} "
        f"{'tok/s ratio':>11}")
  for a, b in zip(ours, theirs):
    print(f"{a['batch']:>5} {a['ttft_s'] * 1e3:>11.1f}ms {b['ttft_s'] * 1e3:>7.1f}ms "
          f"{a['decode_tokens_per_s']:>14.1f} {b['decode_tokens_per_s']:>9.1f} "
          f"{a['decode_tokens_per_s'] / b['decode_tokens_per_s']:>10.2f}x")


if __name__ == "__main__":
  flags.DEFINE_enum("family", "qwen2", sorted(_CLASSES), "transformers model family")
  flags.DEFINE_integer("dim", 512, "hidden size (heads of 64)")
  flags.DEFINE_integer("n_layers", 8, "decoder layers")
  flags.DEFINE_integer("repeats", 3, "alternating timed runs per side; figures are their medians")
  # --vocab_size, --prompt_len, --new_tokens and --batch_sizes are llm_jax.infer.bench's flags.
  app.run(main, flags_parser=console.parse_flags)
