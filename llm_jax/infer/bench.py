"""Generation benchmark: time to first token and decode tokens/s at a few batch sizes.

  python -m llm_jax.infer.bench --model=minimind-26m --vocab_size=6400
  python -m llm_jax.infer.bench --model=tiny --batch_sizes=1,8 --prompt_len=64 --new_tokens=128
  python -m llm_jax.infer.bench --compare_torch [--family=qwen2 --dim=512 --n_layers=8
                                 --vocab_size=8192 --prompt_len=64 --new_tokens=128 --repeats=3]

Random weights (speed does not depend on their values); greedy decoding with no end token, so
every row produces exactly new_tokens. Each shape is generated once untimed to compile first.
Figures are printed, never asserted. `measure_llm_jax` (infer/measure.py) is the reusable part.

--compare_torch builds a random transformers model of --family/--dim/--n_layers (bench_torch.py),
imports it with hf_import so both sides hold the same weights, and times both with the same
definitions. The two sides alternate --repeats times and each figure is the median, so that a
change in the machine's load hits both alike.
"""

import os
import tempfile


import jax
from absl import flags

from configs import models
from llm_jax import console
from llm_jax.infer.generate import Generator
from llm_jax.infer.measure import measure_llm_jax, random_params
from llm_jax.model.config import ModelConfig

_MODEL = flags.DEFINE_string("model", "tiny", "A preset of configs/models.py.")
_VOCAB = flags.DEFINE_integer("vocab_size", 6400, "Vocabulary size of the random model.")
_DTYPE = flags.DEFINE_string("dtype", "", "Compute dtype override (float32 | bfloat16); '' keeps the preset's.")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes to measure.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per row.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "Generated tokens per row.")
_COMPARE_TORCH = flags.DEFINE_bool("compare_torch", False, "Time the same weights in transformers "
                                   "too (a random --family model of --dim/--n_layers, float32).")
_FAMILY = flags.DEFINE_enum("family", "qwen2", ["llama", "qwen2", "qwen3"],
                            "--compare_torch: transformers model family.")
_DIM = flags.DEFINE_integer("dim", 512, "--compare_torch: hidden size (heads of 64).")
_N_LAYERS = flags.DEFINE_integer("n_layers", 8, "--compare_torch: decoder layers.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "--compare_torch: alternating timed runs per side; "
                                "figures are their medians.")


def compare_torch(vocab_size: int, kw: dict) -> None:
  """The --compare_torch table: llm_jax against transformers on the same weights."""
  import torch  # pylint: disable=g-import-not-at-top
  from configs import base  # pylint: disable=g-import-not-at-top
  from llm_jax import rundir  # pylint: disable=g-import-not-at-top
  from llm_jax.convert import hf_import  # pylint: disable=g-import-not-at-top
  from llm_jax.infer import bench_torch  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory(prefix="bench_compare_") as tmp:  # removed afterwards
    hf_model = bench_torch.build_hf(_FAMILY.value, _DIM.value, _N_LAYERS.value, vocab_size,
                                    os.path.join(tmp, "hf"))
    hf_import.import_hf(os.path.join(tmp, "hf"), os.path.join(tmp, "run"), base.get_config())
    params, config = rundir.load_params(os.path.join(tmp, "run"))
  cfg = ModelConfig.from_config(config.model)
  gen = Generator(params, cfg)
  ours_runs, theirs_runs = [], []
  for r in range(_REPEATS.value):  # alternate the two sides
    ours_runs.append(measure_llm_jax(params, cfg, generator=gen, warmup=r == 0, **kw))
    theirs_runs.append(bench_torch.measure_transformers(hf_model, vocab_size, warmup=r == 0, **kw))
  ours, theirs = bench_torch.medians(ours_runs), bench_torch.medians(theirs_runs)
  n_params = sum(p.numel() for p in hf_model.parameters())
  print(f"{_FAMILY.value}: dim={_DIM.value} layers={_N_LAYERS.value} vocab={vocab_size} "
        f"({n_params / 1e6:.1f}M params, float32), prompt {kw['prompt_len']} tokens, "
        f"{kw['new_tokens']} new tokens, greedy, CPU (torch threads {torch.get_num_threads()})")
  print(f"medians of {_REPEATS.value} alternating runs per side; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  print(f"{'batch':>5} {'llm_jax TTFT':>13} {'HF TTFT':>9} {'llm_jax tok/s':>14} {'HF tok/s':>9} "
        f"{'tok/s ratio':>11}")
  for a, b in zip(ours, theirs):
    print(f"{a['batch']:>5} {a['ttft_s'] * 1e3:>11.1f}ms {b['ttft_s'] * 1e3:>7.1f}ms "
          f"{a['decode_tokens_per_s']:>14.1f} {b['decode_tokens_per_s']:>9.1f} "
          f"{a['decode_tokens_per_s'] / b['decode_tokens_per_s']:>10.2f}x")


def main():
  kw = dict(batch_sizes=[int(b) for b in _BATCHES.value], prompt_len=_PROMPT_LEN.value,
            new_tokens=_NEW_TOKENS.value)
  if _COMPARE_TORCH.value:
    compare_torch(_VOCAB.value, kw)
    return
  overrides = {"dtype": _DTYPE.value} if _DTYPE.value else {}
  model_cfg = models.get(_MODEL.value)
  model_cfg.update(overrides)
  cfg = ModelConfig.from_config(model_cfg, vocab_size=_VOCAB.value)
  params = random_params(cfg)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  print(f"llm_jax generation: model={_MODEL.value} ({n_params / 1e6:.1f}M params, {cfg.dtype}) "
        f"prompt={_PROMPT_LEN.value} new={_NEW_TOKENS.value} device={jax.devices()[0].device_kind}")
  for r in measure_llm_jax(params, cfg, **kw):
    print(f"  batch {r['batch']:3d}: time to first token {r['ttft_s'] * 1e3:8.1f} ms   "
          f"decode {r['decode_tokens_per_s']:9.1f} tokens/s   total {r['total_s']:.2f} s")


if __name__ == "__main__":
  console.cli(main)
