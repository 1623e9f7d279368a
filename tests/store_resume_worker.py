"""A training run from a token store that stalls after its checkpoint of step 10, so that
test_data_store.py can kill -9 it there (the process test_store_kill_resume starts).

  python tests/store_resume_worker.py WORKDIR TOKENIZER STORE

Prints `STALLED` once step 10 is checkpointed and the loop waits at step 12.
"""

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llm_jax import checkpoint, console  # noqa: E402
from llm_jax.train import loop  # noqa: E402
from tests.test_loop import small_config  # noqa: E402


def store_config(tokenizer: str, store: str):
  cfg = small_config(tokenizer, steps=20)
  cfg.data.train = f"tokens:{store}"
  cfg.checkpoint.async_save = False
  return cfg


def main(workdir: str, tokenizer: str, store: str) -> None:
  def hook(step, batch):
    del batch
    if step == 12:
      while 10 not in checkpoint.steps(workdir):
        time.sleep(0.05)
      print("STALLED", flush=True)
      time.sleep(600)  # killed here

  loop.train_and_evaluate(store_config(tokenizer, store), workdir, batch_hook=hook)


if __name__ == "__main__":
  console.setup()
  main(*sys.argv[1:])
