"""Console logging for users: llm_jax's own progress lines at INFO, libraries only at WARNING.

Orbax, JAX and Grain log every checkpoint write and backend probe at INFO through absl's single
logger; a user reading a training run needs none of that.
"""

import logging as py_logging
import os
import sys

# Before TensorFlow can load (where it is installed, clu writes TensorBoard files through it; it is
# never given a device): no C++ chatter and no oneDNN banner on the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position

from llm_jax.packages import MissingPackage  # pylint: disable=g-import-not-at-top,wrong-import-position

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


# Errors a user can cause and fix (a bad value, file, path or record; a diverging loss; a package
# a feature needs): their messages name the field, file or pip command, so the traceback adds nothing.
USER_ERRORS = (ValueError, OSError, FloatingPointError, MissingPackage)


def run_reporting_errors(fn, *args, user_errors=USER_ERRORS, status: int = 1, **kwargs):
  """fn(*args, **kwargs); a user error ends the program with one line `error: ...` on stderr
  and exit status `status` (1), or the error's own `exit_code` (2 for a bad config value, see
  ConfigError); `--verbose` shows the traceback instead."""
  try:
    return fn(*args, **kwargs)
  except user_errors as e:
    if verbose():
      raise
    message = str(e).strip() or type(e).__name__
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    sys.exit(getattr(e, "exit_code", status))


def cli(main, *, user_errors=USER_ERRORS, status: int = 1) -> None:
  """Runs `main()` as a command, the one shape every llm_jax command has: absl flags parsed by
  `parse_flags` (a misspelt field names itself), a stray argument refused, `--verbose` for
  library logs and tracebacks, and a user error (`user_errors`) as one line `error: ...` with
  exit status `status` (a ConfigError: 2). main's return value, if an int, is the exit status.
  Call it under `if __name__ == "__main__":`."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, "Show library logs and tracebacks.")

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    setup(flags.FLAGS.verbose)
    result = run_reporting_errors(main, user_errors=user_errors, status=status)
    return result if isinstance(result, int) and not isinstance(result, bool) else None

  app.run(run, flags_parser=parse_flags)


def config_package_roots(argv: list[str]) -> list[str]:
  """The directories to put on sys.path so that the config files named by `--config=` import
  their siblings: a config in a package directory (configs/sft.py does `from configs import
  base`) needs the directory above that package. From the checkout's root that is the current
  directory, already on sys.path; with llm_jax installed (`pip install -e .`) and the command run
  elsewhere (`--config=~/llm_jax/configs/sft.py`), it is not."""
  roots = []
  for k, arg in enumerate(argv):
    if arg.startswith("--config="):
      value = arg[len("--config="):]
    elif arg == "--config" and k + 1 < len(argv):
      value = argv[k + 1]
    else:
      continue
    path = os.path.abspath(os.path.expanduser(value.split(":")[0]))  # configs/x.py:preset
    package = os.path.dirname(path)
    if os.path.isfile(path) and os.path.isfile(os.path.join(package, "__init__.py")):
      roots.append(os.path.dirname(package))
  return roots


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that answers a misspelt `--config.a.b=v` with one line naming it (instead
  of a traceback from deep inside ml_collections). `cli` passes it to absl."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  for root in config_package_roots(argv):
    if root not in sys.path:
      sys.path.insert(0, root)
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
  sys.stderr.write(f"error: python -m {old} is now python -m {new} (same flags)\n")
  sys.exit(2)
