"""Entry point: `python -m llm_jax.main --config=configs/sft.py --workdir=runs/sft`.

Parses flags and calls the job's function; a notebook calls the same functions directly.
"""

import sys

from absl import flags
from ml_collections import config_flags

from llm_jax import console, fields, jobs

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/<job>.py file; override "
                                          "fields with --config.train.steps=100 etc.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, tokenizer.")
flags.mark_flags_as_required(["config", "workdir"])


def main():
  from llm_jax.model.config import SHAPE_FIELDS  # pylint: disable=g-import-not-at-top
  # A model preset (--config=configs/sft.py:minimind-26m) sets every shape field.
  explicit = fields.explicit_fields(sys.argv, [f"model.{f}" for f in SHAPE_FIELDS])
  result = jobs.run(_CONFIG.value, _WORKDIR.value, explicit=explicit)
  if isinstance(result, dict) and "preempted" in result:  # a training job's result
    from llm_jax.train import loop  # pylint: disable=g-import-not-at-top
    return loop.exit_status(result)  # 143 after SIGTERM
  return 0


if __name__ == "__main__":
  console.cli(main)
