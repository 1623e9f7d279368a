"""A training run with a storage fault, as `python -m llm_jax.main` runs it (one-line errors, the
exit status): the process test_checkpoint_faults.py starts and watches.

  python tests/checkpoint_fault_worker.py MODE WORKDIR TOKENIZER

MODE:
  unwritable_at_start   checkpoints/ cannot be written before the run starts
  unwritable_mid_run    checkpoints/ stops being writable after the checkpoint of step 5
  disk_full_mid_run     files may not grow past 50 kB (RLIMIT_FSIZE, as a full disk) from step
                        101, after the checkpoint of step 100: the save of step 200 fails in the
                        background; the next save would be at step 300
  hung_save             every save from step 10 on never finishes (storage that hangs): prints
                        HUNG when one starts hanging; the test sends SIGTERM
  hung_source           from step 7 (after the checkpoint of step 5) every record read by the
                        loader threads never returns (storage that hangs): prints HUNG at the
                        first such read and STALLED once the loop has made no step for 1 s; the
                        test sends SIGTERM

Prints `STEP <n>` for the last step the loop reached, then exits as llm_jax.main would.
"""

import asyncio
import os
import resource
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llm_jax import checkpoint, console  # noqa: E402
from llm_jax.train import loop  # noqa: E402
from tests.test_loop import small_config  # noqa: E402


def deny_writes(path: str) -> bool:
  """Makes the directory `path` refuse new entries, also to root (chattr +i); False if this
  system cannot."""
  if os.geteuid() != 0:
    os.chmod(path, 0o555)
    return True
  return subprocess.run(["chattr", "+i", path], capture_output=True).returncode == 0


def allow_writes(path: str) -> None:
  if os.geteuid() != 0:
    os.chmod(path, 0o755)
  else:
    subprocess.run(["chattr", "-i", path], capture_output=True)


def _hang_saves_from(first_step: int) -> None:
  """Orbax's commit of each checkpoint from `first_step` on waits forever (a hung NFS server)."""
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  real = atomicity.on_commit_callback

  async def on_commit_callback(tmp_dir, **kwargs):
    name = os.path.basename(str(tmp_dir.get_final()))
    if name.isdigit() and int(name) >= first_step:
      print("HUNG", name, flush=True)
      await asyncio.sleep(3600)
    return await real(tmp_dir, **kwargs)

  atomicity.on_commit_callback = on_commit_callback


def _hang_reads_from(reached: list, first_step: int) -> None:
  """Every record read once the loop reached `first_step` blocks forever, in whichever loader
  thread reads it; a watcher prints STALLED when the loop has not moved for a second."""
  import threading  # pylint: disable=g-import-not-at-top
  from llm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  real = pipeline.DocReader.__getitem__
  hung = threading.Event()

  def getitem(self, i):
    if reached[0] >= first_step:
      if not hung.is_set():
        hung.set()
        print("HUNG", reached[0], flush=True)
      while True:
        time.sleep(3600)
    return real(self, i)

  def watch():
    hung.wait()
    last, since = reached[0], time.monotonic()
    while time.monotonic() - since < 1.0:
      time.sleep(0.05)
      if reached[0] != last:
        last, since = reached[0], time.monotonic()
    print("STALLED", last, flush=True)

  pipeline.DocReader.__getitem__ = getitem
  # Loader threads read ahead 500 records by default, which keeps a hung loop fed for ~90 steps
  # (seconds of checkpoints); 16 stall it at once, the same way.
  import grain  # pylint: disable=g-import-not-at-top
  real_iter = grain.MapDataset.to_iter_dataset

  def to_iter_dataset(self, read_options=None, **kw):
    return real_iter(self, read_options or grain.ReadOptions(num_threads=4,
                                                              prefetch_buffer_size=16), **kw)

  grain.MapDataset.to_iter_dataset = to_iter_dataset
  threading.Thread(target=watch, daemon=True).start()


def main(mode: str, workdir: str, tokenizer: str) -> int:
  cfg = small_config(tokenizer, steps=20)
  reached = [0]
  ckpt = checkpoint.checkpoint_dir(workdir)

  def hook(step, batch):
    del batch
    reached[0] = step
    if mode == "unwritable_mid_run" and step == 6:
      while checkpoint.steps(workdir) != [5]:
        time.sleep(0.01)
      assert deny_writes(ckpt)
    if mode == "disk_full_mid_run" and step == 101:
      while checkpoint.steps(workdir) != [100]:
        time.sleep(0.01)
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
      resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY))
    if mode == "disk_full_mid_run" and step > 200:
      time.sleep(0.05)  # the failure has 100 steps (at least 5 s) to be noticed

  if mode == "unwritable_at_start":
    os.makedirs(ckpt)
    if not deny_writes(ckpt):
      print("SKIP cannot make a directory unwritable here", flush=True)
      return 0
  if mode == "disk_full_mid_run":
    cfg.train.steps, cfg.checkpoint.every, cfg.train.log_every = 400, 100, 100
  if mode == "hung_save":
    cfg.train.steps = 10_000
    cfg.checkpoint.sigterm_wait = 2.0
    _hang_saves_from(10)
  if mode == "hung_source":
    cfg.train.steps = 10_000
    _hang_reads_from(reached, 7)
  try:
    result = console.run_reporting_errors(loop.train_and_evaluate, cfg, workdir, batch_hook=hook)
  finally:
    print("STEP", reached[0], flush=True)
  return loop.exit_status(result)


if __name__ == "__main__":
  console.setup()
  sys.exit(main(*sys.argv[1:]))
