"""Console logging for users: llm_jax's own progress lines at INFO, libraries only at WARNING.

Orbax, JAX and Grain log every checkpoint write and backend probe at INFO through absl's single
logger; a user reading a training run needs none of that.
"""

import logging as py_logging
import os

from absl import logging

_OWN = (os.sep + "llm_jax" + os.sep,)


# Warnings libraries give for things llm_jax does on purpose (reading a run read-only).
_EXPECTED_WARNINGS = ("Given directory is read only",)


class _OwnInfoOnly(py_logging.Filter):

  def filter(self, record: py_logging.LogRecord) -> bool:
    if any(p in record.pathname for p in _OWN):
      return True
    if record.levelno == py_logging.WARNING:
      return not str(record.msg).startswith(_EXPECTED_WARNINGS)
    return record.levelno > py_logging.WARNING


def setup(verbose: bool = False) -> None:
  logging.set_verbosity(logging.INFO)
  if not verbose:
    logging.get_absl_handler().addFilter(_OwnInfoOnly())


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that answers a misspelt `--config.a.b=v` with one line naming it (instead
  of a traceback from deep inside ml_collections). Pass as `app.run(main, flags_parser=...)`."""
  import sys

  from absl import flags
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    msg = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
    culprits = [a.split("=")[0] for a in argv if a.startswith("--config.")
                and any(part.strip("'\"") in msg for part in a.split("=")[0].split(".")[1:])]
    where = culprits[-1] if culprits else "a --config override"
    sys.stderr.write(f"error: {where} names no field of the config ({msg})\n")
    sys.exit(2)
  except flags.Error as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)
