"""One process of test_multiprocess.py: a real training run as process JAX_PROCESS_ID of 2.

Dumps the batches this process fed the loop, so the test can rebuild the global batches.
"""

import os
import sys

import jax
import numpy as np

from configs import sft
from llm_jax.train import loop


def config():
  c = sft.get_config()
  c.model.dim, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 32, 2, 4, 2
  c.model.mlp_dim = 64
  c.data.seq_len, c.data.batch_size = 64, 8
  c.data.synthetic.n_entities = 40
  c.data.tokenizer.vocab_size = 600
  c.train.steps, c.train.warmup_steps, c.train.log_every = 5, 1, 1
  c.train.eval_every, c.train.eval_batches = 5, 2
  c.checkpoint.every = 5
  return c


def main(workdir: str, out_dir: str):
  seen = []
  result = loop.train_and_evaluate(config(), workdir, batch_hook=lambda s, b: seen.append(b))
  rank = jax.process_index()
  np.savez(os.path.join(out_dir, f"batches_{rank}.npz"),
           **{f"{k}.{s}": b[k] for s, b in enumerate(seen) for k in b})
  print("RESULT", rank, jax.process_count(), jax.device_count(), result["loss"],
        result["eval_loss"], flush=True)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
