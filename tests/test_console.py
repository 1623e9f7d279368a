"""What a user sees on the terminal (issue 24): clean lines without absl's prefix (kept with
--verbose and in a --log_dir log file), an ETA on step lines, and long phases that say what they
are doing and how far along they are (one line redrawn on a terminal, plain lines in a file)."""

import io
import os
import re
import subprocess
import sys
import time

from llm_jax import console
from llm_jax.train import metrics
from tests.conftest import ROOT

ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ", re.M)

# A command's logging as console.cli sets it up: absl flags parsed, then console.setup.
_SCRIPT = """
import sys
from absl import flags, logging
from llm_jax import console
flags.DEFINE_bool("verbose", False, "")
flags.FLAGS(sys.argv)
logging.use_absl_handler()  # as absl.app.run does
console.setup(flags.FLAGS.verbose)
with console.Phase("training a tokenizer") as phase:
  phase.result = "600 pieces"
bar = console.Progress(4, "knowledge")
for _ in range(4):
  bar.update(1)
logging.warning("a warning of the script's own")
"""


def _run(*flags):
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  out = subprocess.run([sys.executable, "-c", _SCRIPT, *flags], env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  return out.stderr


def test_console_lines_are_clean_and_the_prefix_stays_for_verbose_and_log_files(tmp_path):
  clean = _run()
  assert not ABSL_PREFIX.search(clean), clean
  lines = clean.splitlines()
  assert lines[0] == "training a tokenizer ..."
  assert re.fullmatch(r"training a tokenizer: 600 pieces in \d+ s", lines[1]), lines
  assert lines[-2].startswith("knowledge: 4/4 (100%) in ") and "left" not in lines[-2]
  assert lines[-1] == "warning: a warning of the script's own"
  verbose = _run("--verbose")
  assert len(ABSL_PREFIX.findall(verbose)) >= 3 and "] training a tokenizer ..." in verbose
  # absl's --log_dir: a log file with every line's prefix; the console stays clean
  logged = _run(f"--log_dir={tmp_path}")
  assert not ABSL_PREFIX.search(logged) and "training a tokenizer: 600 pieces" in logged
  (log_file,) = [p for p in tmp_path.iterdir() if ".log.INFO." in p.name]
  text = log_file.read_text()
  assert ABSL_PREFIX.search(text) and "] training a tokenizer: 600 pieces in" in text


class _Terminal(io.StringIO):

  def isatty(self):
    return True


def test_on_a_terminal_long_phases_redraw_one_line():
  term = _Terminal()
  bar = console.Progress(3, "rouge", stream=term)
  bar.update(1)
  time.sleep(0.01)
  bar.update(2)
  frames = term.getvalue().split("\r")[1:]
  assert frames[0].startswith("rouge [##########....................] 1/3 0 s")
  assert "left" in frames[0] and frames[1].startswith("rouge [" + "#" * 30 + "] 3/3")
  assert term.getvalue().endswith("\n") and term.getvalue().count("\n") == 1
  term = _Terminal()
  with console.Phase("compiling the train step", stream=term):
    time.sleep(1.3)  # the counting line redraws once a second
  shown = term.getvalue()
  assert shown.startswith("compiling the train step ...\rcompiling the train step ... 1 s")
  assert shown.endswith("\r\033[K")  # cleared for the result line, which the log writes


def test_step_lines_have_an_eta_from_the_recent_step_time():
  line = metrics.format_line(100, 300, {"loss": 1.5, "step_time_s": 0.5, "tokens_per_s": 9000.0})
  assert line == "step 100/300 | loss 1.5000 | 9,000 tokens/s | 0.500 s/step | ETA 1 min 40 s"
  assert "ETA" not in metrics.format_line(300, 300, {"loss": 1.5, "step_time_s": 0.5})
  assert [console.duration(s) for s in (0.4, 59.6, 61, 3600 * 2 + 125)] == [
      "0 s", "1 min 00 s", "1 min 01 s", "2 h 02 min"]
