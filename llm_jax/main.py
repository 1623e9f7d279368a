"""Entry point: `python -m llm_jax.main --config=configs/sft.py --workdir=runs/sft`.

Parses flags and calls the job's function; a notebook calls the same functions directly.
"""

import os
import sys

# Before JAX or TensorFlow load: no TF C++ chatter on the console. TensorFlow only writes
# TensorBoard files here, so its oneDNN kernels (and their start-up banner) are not wanted.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags
from ml_collections import config_flags

from llm_jax import console, fields, jobs

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/<job>.py file; override "
                                          "fields with --config.train.steps=100 etc.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, tokenizer.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Also show libraries' INFO logs (Orbax, JAX, Grain).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.setup(_VERBOSE.value)
  from llm_jax.model.config import SHAPE_FIELDS  # pylint: disable=g-import-not-at-top
  # A model preset (--config=configs/sft.py:minimind-26m) sets every shape field.
  explicit = fields.explicit_fields(sys.argv, [f"model.{f}" for f in SHAPE_FIELDS])
  result = console.run_reporting_errors(jobs.run, _CONFIG.value, _WORKDIR.value, explicit=explicit)
  if isinstance(result, dict) and result.get("preempted"):
    from llm_jax.train.loop import PREEMPTED_EXIT_CODE  # pylint: disable=g-import-not-at-top
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  app.run(main, flags_parser=console.parse_flags)
