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
  handler = logging.get_absl_handler()
  if not verbose and not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
    handler.addFilter(_OwnInfoOnly())


def verbose() -> bool:
  """Whether `setup(verbose=True)` (or no setup) left library logs on: then long dumps (the
  whole config) are worth printing too."""
  return not any(isinstance(f, _OwnInfoOnly) for f in logging.get_absl_handler().filters)


class ConfigError(ValueError):
  """A config value or override the job cannot use; CLIs print its one line and exit 2 (the
  usage-error status, as for a misspelt flag)."""
  exit_code = 2


# Errors a user can cause and fix (a bad value, file, path or record; a diverging loss): their
# messages name the field or file and the fix, so the traceback adds nothing.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def run_reporting_errors(fn, *args, **kwargs):
  """fn(*args, **kwargs); a user error ends the program with one line `error: ...` on stderr
  and exit status 1, or the error's `exit_code` (2 for a bad config value, see
  ConfigError); `--verbose` shows the traceback instead."""
  import sys  # pylint: disable=g-import-not-at-top
  try:
    return fn(*args, **kwargs)
  except USER_ERRORS as e:
    if verbose():
      raise
    message = str(e).strip() or type(e).__name__
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    sys.exit(getattr(e, "exit_code", 1))


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


def moved(old: str, new: str) -> None:
  """The whole of a command that has a new name: one line naming it, exit status 2."""
  import sys  # pylint: disable=g-import-not-at-top
  sys.stderr.write(f"error: python -m {old} is now python -m {new} (same flags)\n")
  sys.exit(2)
