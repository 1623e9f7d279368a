"""Ctrl-C in a terminal program that runs JAX: stop the current answer, never crash.

Python's default SIGINT handler raises KeyboardInterrupt wherever the main thread happens to be.
Raised inside JAX's tracing or XLA's compilation (C++ on other threads), that can leave the
runtime half torn down, and the interpreter's exit then crashes ("Fatal Python error:
Segmentation fault"). So while work runs, Ctrl-C only sets a flag that the generation loop polls
between tokens (`Generator.generate(should_stop=...)`); the work ends at the next token, or as
soon as a compile finishes. A second Ctrl-C before that exits at once with os._exit, which skips
the teardown that crashes. At the prompt, Ctrl-C also only sets a flag, which `read_line` turns
into KeyboardInterrupt where it polls stdin: raised at an arbitrary bytecode, the exception could
escape the chat loop between two statements (a second Ctrl-C right after the first one's message).
"""

import contextlib
import os
import select
import signal
import sys

EXIT_CODE = 130  # the shell's convention for "ended by SIGINT"


class Interrupts:

  def __init__(self, write=None):
    self._write = write or (lambda s: (sys.stderr.write(s), sys.stderr.flush()))
    self.requested = False
    self._busy = False
    self._at_prompt = False  # a Ctrl-C outside work, for read_line to raise
    self._previous = None

  def install(self) -> "Interrupts":
    try:
      self._previous = signal.signal(signal.SIGINT, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): leave Ctrl-C alone
      self._previous = None
    return self

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
      self._previous = None

  def _handle(self, signum, frame):
    if not self._busy:
      self._at_prompt = True
      return
    if self.requested:  # the second Ctrl-C while work still runs (e.g. a long compile)
      self._write("\n")
      os._exit(EXIT_CODE)
    self.requested = True

  def should_stop(self) -> bool:
    return self.requested

  def take_prompt_interrupt(self) -> bool:
    """Whether Ctrl-C was pressed outside work since the last call (then read_line raises)."""
    hit, self._at_prompt = self._at_prompt, False
    return hit

  @contextlib.contextmanager
  def busy(self):
    """Around work that Ctrl-C should stop gracefully (generation, compilation)."""
    self.requested, self._busy = False, True
    try:
      yield self
    finally:
      self._busy = False


def read_line(prompt: str, interrupted=lambda: False) -> str:
  """input() that Ctrl-C always interrupts: raises KeyboardInterrupt when `interrupted()` (an
  Interrupts' take_prompt_interrupt). With JAX's thread pools running, the kernel may deliver
  SIGINT to any thread; a main thread blocked in read() then never sees it. Polling stdin returns
  to Python every 0.2 s, where the pending handler runs and the flag is checked."""
  if interrupted():
    raise KeyboardInterrupt
  sys.stdout.write(prompt)
  sys.stdout.flush()
  try:
    sys.stdin.fileno()
  except (AttributeError, OSError, ValueError):  # not a file (a test's StringIO): no polling
    pass
  else:
    while not select.select([sys.stdin], [], [], 0.2)[0]:
      if interrupted():
        raise KeyboardInterrupt
  line = sys.stdin.readline()
  if not line:
    raise EOFError
  return line.rstrip("\n")
