"""A progress bar for eval tasks: redrawn in place on a terminal, a log line every quarter when
the output is a file (CI logs, nohup), so long sweeps show where they are either way."""

import sys
import time

from absl import logging


class Progress:

  def __init__(self, total: int, desc: str, stream=None):
    self.total, self.desc, self.done = max(int(total), 0), desc, 0
    self.stream = stream or sys.stderr
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.start = time.perf_counter()
    self._next_log = 0.25

  def update(self, n: int = 1) -> None:
    self.done = min(self.done + n, self.total)
    frac = self.done / self.total if self.total else 1.0
    elapsed = time.perf_counter() - self.start
    if self.tty:
      bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
      self.stream.write(f"\r{self.desc} [{bar}] {self.done}/{self.total} {elapsed:.0f}s")
      if self.done >= self.total:
        self.stream.write("\n")
      self.stream.flush()
    elif frac >= self._next_log or self.done >= self.total:
      logging.info("%s: %d/%d (%.0f%%) in %.1f s", self.desc, self.done, self.total, 100 * frac,
                   elapsed)
      while self._next_log <= frac:
        self._next_log += 0.25
