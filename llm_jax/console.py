"""Console logging for users: llm_jax's own progress lines at INFO, libraries only at WARNING.

Orbax, JAX and Grain log every checkpoint write and backend probe at INFO through absl's single
logger; a user reading a training run needs none of that.
"""

import logging as py_logging
import os
import sys
import threading
import time

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


class _CleanFormatter(logging.PythonFormatter):
  """Lines as a user reads them on the terminal: the message alone (`warning: ` / `ERROR: ` before
  those), without absl's `I1206 22:43:12.686666 139688333802368 writers.py:45] ` prefix, which
  pushed a step line past 250 columns. A log file (absl's --log_dir) keeps the whole prefix."""

  def format(self, record: py_logging.LogRecord) -> str:
    stream = logging.get_absl_handler().python_handler.stream
    if stream not in (sys.stderr, sys.__stderr__):  # a log file: timestamps, thread, file:line
      return super().format(record)
    message = py_logging.Formatter.format(self, record)  # the message and any traceback
    if record.levelno >= py_logging.ERROR:  # not "error: ": that is the command's one last line
      message = "ERROR: " + message
    elif record.levelno >= py_logging.WARNING:
      message = "warning: " + message
    # On a terminal a line may be a phase's counting line (Phase, Progress): the log line takes
    # its place (carriage return, erase the line), and the count goes on below it.
    return ("\r\033[K" + message) if _on_terminal(stream) else message


def setup(verbose: bool = False) -> None:
  """Console logging for a command: llm_jax's own lines, clean (see _CleanFormatter); with
  `verbose`, every library's INFO lines too, with absl's prefix. With absl's `--log_dir=DIR`, the
  same lines also go to a log file there, each with its prefix."""
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not verbose:
    if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
      handler.addFilter(_OwnInfoOnly())
    handler.setFormatter(_CleanFormatter())
  else:
    handler.setFormatter(logging.PythonFormatter())
  from absl import flags  # pylint: disable=g-import-not-at-top
  if flags.FLAGS.is_parsed() and flags.FLAGS["log_dir"].value:
    handler.use_absl_log_file()
    flags.FLAGS.alsologtostderr = True  # the console keeps its lines


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


def duration(seconds: float) -> str:
  """"42 s", "3 min 05 s", "1 h 02 min": how long something takes, at a useful precision."""
  seconds = max(0, int(round(seconds)))
  if seconds < 60:
    return f"{seconds} s"
  if seconds < 3600:
    return f"{seconds // 60} min {seconds % 60:02d} s"
  return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _on_terminal(stream) -> bool:
  return hasattr(stream, "isatty") and stream.isatty()


class Progress:
  """A long phase whose size is known (eval batches, prompts, checkpoints): one line redrawn in
  place on a terminal (`knowledge [######........] 40/96 12 s, about 17 s left`), a log line every
  quarter when the output is a file (CI logs, nohup), so long work shows where it is either way."""

  def __init__(self, total: int, desc: str, stream=None):
    self.total, self.desc, self.done = max(int(total), 0), desc, 0
    self.stream = stream or sys.stderr
    self.tty = _on_terminal(self.stream)
    self.start = time.perf_counter()
    self._next_log = 0.25

  def update(self, n: int = 1) -> None:
    self.done = min(self.done + n, self.total)
    frac = self.done / self.total if self.total else 1.0
    elapsed = time.perf_counter() - self.start
    left = elapsed / self.done * (self.total - self.done) if self.done else None
    eta = f", about {duration(left)} left" if left and self.done < self.total else ""
    if self.tty:
      bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
      self.stream.write(f"\r{self.desc} [{bar}] {self.done}/{self.total} {duration(elapsed)}{eta}"
                        "\033[K")
      if self.done >= self.total:
        self.stream.write("\n")
      self.stream.flush()
    elif frac >= self._next_log or self.done >= self.total:
      logging.info("%s: %d/%d (%.0f%%) in %s%s", self.desc, self.done, self.total, 100 * frac,
                   duration(elapsed), eta)
      while self._next_log <= frac:
        self._next_log += 0.25


class Phase:
  """A long phase of unknown length (training a tokenizer, compiling): `desc ...` when it starts;
  on a terminal that line then counts the seconds in place; `desc: <result> in 12 s` when it
  ends. A context manager (set `.result` inside to say the outcome), or start() ... finish()."""

  def __init__(self, desc: str, stream=None):
    self.desc, self.result = desc, "done"
    self.stream = stream or sys.stderr
    self.start_time = None
    self._stop = threading.Event()
    self._ticker = None

  def start(self) -> "Phase":
    self.start_time = time.perf_counter()
    if _on_terminal(self.stream):
      self.stream.write(f"{self.desc} ...")
      self.stream.flush()
      self._ticker = threading.Thread(target=self._tick, daemon=True)
      self._ticker.start()
    else:
      logging.info("%s ...", self.desc)
    return self

  def _tick(self) -> None:
    while not self._stop.wait(1.0):
      self.stream.write(f"\r{self.desc} ... {duration(self.elapsed())}\033[K")
      self.stream.flush()

  def elapsed(self) -> float:
    return time.perf_counter() - self.start_time

  def stop(self) -> None:
    """Stops the counting line (idempotent); finish() also says the result."""
    self._stop.set()
    if self._ticker is not None:
      self._ticker.join()
      self._ticker = None
      self.stream.write("\r\033[K")  # the counting line gives way to the log's own lines
      self.stream.flush()

  def finish(self, result: str | None = None) -> float:
    """Ends the phase with `desc: result in N s`; returns the seconds it took."""
    self.stop()
    seconds = self.elapsed()
    logging.info("%s: %s in %s", self.desc, result or self.result, duration(seconds))
    return seconds

  def __enter__(self) -> "Phase":
    return self.start()

  def __exit__(self, exc_type, *exc) -> None:
    if exc_type is None:
      self.finish()
    else:  # the error says what went wrong; no "done" line
      self.stop()
