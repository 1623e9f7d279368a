"""Generation benchmark: time to first token and decode tokens/s at a few batch sizes.

  python -m llm_jax.infer.bench --model=minimind-26m --vocab_size=6400
  python -m llm_jax.infer.bench --model=tiny --batch_sizes=1,8 --prompt_len=64 --new_tokens=128

Random weights (speed does not depend on their values); greedy decoding with no end token, so
every row produces exactly new_tokens. Each shape is generated once untimed to compile first.
Figures are printed, never asserted. `measure_llm_jax` is the reusable part (e.g. to compare with
transformers on the same shapes).
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import models
from llm_jax import console
from llm_jax.infer.generate import Generator
from llm_jax.infer.sampling import SamplingConfig
from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder

_MODEL = flags.DEFINE_string("model", "tiny", "A preset of configs/models.py.")
_VOCAB = flags.DEFINE_integer("vocab_size", 6400, "Vocabulary size of the random model.")
_DTYPE = flags.DEFINE_string("dtype", "", "Compute dtype override (float32 | bfloat16); '' keeps the preset's.")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes to measure.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per row.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "Generated tokens per row.")


def measure_llm_jax(params, cfg: ModelConfig, *, batch_sizes=(1, 8), prompt_len: int = 64,
                    new_tokens: int = 128, seed: int = 0, mesh=None, rules=(), generator=None,
                    warmup: bool = True) -> list[dict]:
  """[{"batch", "ttft_s", "decode_tokens_per_s", "total_s"}] for greedy generation of random prompts.

  ttft_s: from the call to the first token on the host (prefill + one step). decode_tokens_per_s:
  batch * (new_tokens - 1) / (time of the last token - time of the first). `generator` reuses a
  Generator of these params between calls; warmup=False skips the untimed compiling run.
  """
  gen = generator or Generator(params, cfg, mesh=mesh, rules=rules)
  rng = np.random.default_rng(seed)
  sampling = SamplingConfig(temperature=0.0, max_new_tokens=new_tokens)
  results = []
  for batch in batch_sizes:
    prompts = rng.integers(0, cfg.vocab_size, (batch, prompt_len)).tolist()
    if warmup:
      gen.generate(prompts, sampling)  # compile these shapes
    stamps = []
    start = time.perf_counter()
    gen.generate(prompts, sampling, callback=lambda row, tok: row == 0 and stamps.append(time.perf_counter()))
    total = time.perf_counter() - start
    results.append({"batch": batch, "ttft_s": stamps[0] - start, "total_s": total,
                    "decode_tokens_per_s": batch * (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)})
  return results


def random_params(cfg: ModelConfig, seed: int = 0):
  ids = jnp.zeros((1, 1), jnp.int32)
  init = jax.jit(lambda rng: nn.unbox(Decoder(cfg).init(rng, ids, ids, ids + 1)["params"]))
  return init(jax.random.key(seed))


def main(argv):
  console.setup()
  del argv
  overrides = {"dtype": _DTYPE.value} if _DTYPE.value else {}
  model_cfg = models.get(_MODEL.value)
  model_cfg.update(overrides)
  cfg = ModelConfig.from_config(model_cfg, vocab_size=_VOCAB.value)
  params = random_params(cfg)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  print(f"llm_jax generation: model={_MODEL.value} ({n_params / 1e6:.1f}M params, {cfg.dtype}) "
        f"prompt={_PROMPT_LEN.value} new={_NEW_TOKENS.value} device={jax.devices()[0].device_kind}")
  for r in measure_llm_jax(params, cfg, batch_sizes=[int(b) for b in _BATCHES.value],
                           prompt_len=_PROMPT_LEN.value, new_tokens=_NEW_TOKENS.value):
    print(f"  batch {r['batch']:3d}: time to first token {r['ttft_s'] * 1e3:8.1f} ms   "
          f"decode {r['decode_tokens_per_s']:9.1f} tokens/s   total {r['total_s']:.2f} s")


if __name__ == "__main__":
  app.run(main, flags_parser=console.parse_flags)
