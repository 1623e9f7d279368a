"""Orbax checkpointing: the one module that touches the Orbax API (it renames often).

The checkpoints of a run directory (rundir.py owns the rest of it: config.json, the tokenizer,
what a run's parameters are):
  checkpoints/<step>/state  {"step", "params", "opt_state"} (params-only for imported models;
                           a LoRA run's "params" are its adapters, see rundir.load_params)
  checkpoints/<step>/data   the Grain iterator state, so a resumed run sees the same batches
Orbax writes each step to a temporary directory and renames it when complete, so a crash
mid-save never leaves a half-written checkpoint that looks valid.

A training run starts its saves through `Saves`, which never blocks the caller in Orbax for
long: a save that fails (permission, disk full) becomes one `SaveFailed` line naming the path
and the OS error as soon as it is known, and a wait for a save in flight can be cut short
(SIGTERM). Readers list only finished steps (`steps`), so they read a run while it is written.
"""

import os
import re
import time
from typing import Any, Callable, Optional

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

STATE = "state"
FROZEN = "frozen"  # the train state's never-trained parameters (not checkpointed)
DATA = "data"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, *, keep: int = 3, async_save: bool = True,
                 with_data: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager over workdir/checkpoints with items "state" (and "data")."""
  if read_only:
    options = ocp.CheckpointManagerOptions(
        read_only=True, create=False, save_interval_steps=0, max_to_keep=None)
  else:
    # Step directories are made in save() itself: Orbax's asynchronous creation, when it fails
    # (an unwritable directory), leaves save() waiting 300 s for a signal that never comes.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save,
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
  # One handler per item, registered for both its save and restore args (the older
  # `item_names=` form is deprecated in Orbax 0.12 and cannot read metadata read-only).
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  state_handler = ocp.PyTreeCheckpointHandler()
  registry.add(STATE, ocp.args.PyTreeSave, state_handler)
  registry.add(STATE, ocp.args.PyTreeRestore, state_handler)
  if with_data:
    data_handler = grain.checkpoint.CheckpointHandler()
    registry.add(DATA, grain.checkpoint.CheckpointSave, data_handler)
    registry.add(DATA, grain.checkpoint.CheckpointRestore, data_handler)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, handler_registry=registry)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter=None,
         force: bool = False) -> bool:
  """Starts saving `state` (and the data iterator's position); returns whether it saved.

  A state's "frozen" entry (a LoRA base, a DPO reference, a distillation teacher) is not saved:
  the job reads it again from its source run when it resumes (train/frozen.py, lora_state.py)."""
  state = {k: v for k, v in state.items() if k != FROZEN}
  args = {STATE: ocp.args.PyTreeSave(state)}
  if data_iter is not None:
    args[DATA] = grain.checkpoint.CheckpointSave(data_iter)
  return manager.save(step, args=ocp.args.Composite(**args), force=force)


class SaveFailed(OSError):
  """A checkpoint could not be written; the message names the path, the OS error and the
  checkpoints that remain."""


def _os_error(e: BaseException) -> tuple[str, str]:
  """(the OS error's text, the path it names) from an exception or the ones behind it. Orbax
  wraps them; TensorStore writes them into its message: `Failed writing: "<path>": ...: File too
  large [os_error_code='27']`."""
  seen, cause = set(), e
  while cause is not None and id(cause) not in seen:
    seen.add(id(cause))
    if isinstance(cause, OSError) and cause.strerror:
      path = str(cause.filename or "")
      return cause.strerror, f"{path} -> {cause.filename2}" if cause.filename2 else path
    text = str(cause)
    code = re.search(r"os_error_code='?(\d+)", text)
    if code:
      path = re.search(r'(?:Failed writing|local file): "([^"]+)"', text)
      return os.strerror(int(code.group(1))), path.group(1) if path else ""
    cause = cause.__cause__ or cause.__context__
  return f"{type(e).__name__}: {_first_line(e)}", ""


def save_failed(workdir: str, step: int, e: BaseException) -> SaveFailed:
  """The one line a failed save of `step` is reported with."""
  error, path = _os_error(e)
  kept = steps(workdir)
  where = path or checkpoint_dir(workdir)
  return SaveFailed(
      f"could not write the checkpoint of step {step}: {where}: {error}; "
      + (f"the checkpoints of steps {kept} in {checkpoint_dir(workdir)} are complete and kept"
         if kept else f"no checkpoint in {checkpoint_dir(workdir)} was completed")
      + ". Free space or fix the directory's permissions, then rerun the same command to resume.")


class Saves:
  """Starts the saves of a run and watches them, never leaving the caller blocked in Orbax:

    saves.start(step, state, data_iter)   after the previous save finished; one line on failure
    saves.poll()                          each step: raises the failure of a save in flight
    saves.wait(deadline)                  the end; False if `deadline()` passed first

  `deadline()` gives a time.monotonic() after which waiting stops (None: wait), e.g. a few
  seconds after SIGTERM. A save that fails raises SaveFailed; completed checkpoints are kept
  (Orbax removes old ones only after a newer one is complete)."""

  def __init__(self, manager: ocp.CheckpointManager, workdir: str, *, watch: bool = True):
    self.manager, self.workdir = manager, workdir
    self.pending: Optional[int] = None  # the step of a save started and not yet seen finished
    self.watch = watch  # poll() looks at saves in flight (one process: see poll)

  def start(self, step: int, state: Any, data_iter=None,
            deadline: Callable[[], Optional[float]] = lambda: None) -> bool:
    """Starts saving `step` (once the previous save is done); False if the wait for that one
    ran past `deadline`, then nothing was started."""
    if not self.wait(deadline):
      return False
    self.pending = step
    try:
      save(self.manager, step, state, data_iter, force=True)
    except Exception as e:  # pylint: disable=broad-except (Orbax raises many types)
      self.pending = None  # nothing runs in the background after a failed start
      raise save_failed(self.workdir, step, e) from e
    return True

  def poll(self) -> None:
    """Raises SaveFailed if the save in flight has failed; never waits. (Off in a multi-process
    job, whose processes must stop at the same step: there the next save or the end reports.)"""
    if self.watch and self.pending is not None and not self.manager.is_saving_in_progress():
      self._finish()

  def wait(self, deadline: Callable[[], Optional[float]] = lambda: None,
           interval: float = 0.05) -> bool:
    """Waits for the save in flight; True when there is none left, False when `deadline()`
    passed first (the save goes on in Orbax's threads; the caller gives it up)."""
    while self.pending is not None and self.manager.is_saving_in_progress():
      end = deadline()
      if end is not None and time.monotonic() >= end:
        return False
      time.sleep(interval)  # a signal handler runs here, unlike in a thread join
    if self.pending is not None:
      self._finish()
    return True

  def _finish(self) -> None:
    step, self.pending = self.pending, None
    try:
      self.manager.wait_until_finished()  # the save is done: returns at once, or raises its error
    except Exception as e:  # pylint: disable=broad-except
      raise save_failed(self.workdir, step, e) from e
    logging.debug("Saved the checkpoint of step %d", step)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iter=None) -> Any:
  """Restores the train state into the shardings of `abstract_state` (ShapeDtypeStructs with
  .sharding) and, if given, moves `data_iter` to where the checkpointed run stopped. A "frozen"
  entry of `abstract_state` is not in the checkpoint (see `save`) and not restored."""
  abstract_state = {k: v for k, v in abstract_state.items() if k != FROZEN}
  args = {STATE: _restore_args(abstract_state)}
  if data_iter is not None:
    args[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = manager.restore(step, args=ocp.args.Composite(**args))
  return restored[STATE]


def _restore_args(abstract_tree: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
  return ocp.args.PyTreeRestore(
      item=abstract_tree,
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_tree),
      partial_restore=partial,
  )


def steps(workdir: str) -> list[int]:
  """Finished checkpoints' steps. Orbax writes `<step>.orbax-checkpoint-tmp` and renames it to
  `<step>` when complete, so only all-digit names are whole checkpoints."""
  d = checkpoint_dir(workdir)
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit() and os.path.isdir(os.path.join(d, n)))


def pick_step(workdir: str, step: int) -> int:
  available = steps(workdir)
  if not available:
    raise FileNotFoundError(f"no checkpoints under {checkpoint_dir(workdir)}")
  if step < 0:
    return max(available)
  if step not in available:
    raise ValueError(f"step {step} is not in {checkpoint_dir(workdir)}; available: {available}")
  return step


def save_params(workdir: str, params: Any, step: int = 0) -> None:
  """Writes a params-only checkpoint of `step` (rundir.save_params adds config.json)."""
  with make_manager(workdir, keep=1, async_save=False, with_data=False) as m:
    save(m, step, {"step": step, "params": params}, force=True)
    m.wait_until_finished()
  logging.info("Wrote parameters of step %d to %s", step, checkpoint_dir(workdir))


def restore_params(workdir: str, step: int = -1, shardings: Any = None, dtype: Any = None
                   ) -> tuple[int, Any]:
  """(step, the parameters stored at it) without the optimizer state, as stored (a LoRA run's
  are its adapters: rundir.load_params merges them).

  `step` -1 takes the newest checkpoint that can be read: a damaged newer one is reported and
  skipped (never deleted). `shardings`: a tree of NamedShardings matching the params, or one
  Sharding for all of them; None puts them on one device. `dtype`: cast every parameter to it
  while reading (e.g. bf16 imports trained in float32).
  """
  def read(s):
    # The data item's handler is registered (though not restored) so Orbax knows the item.
    with make_manager(workdir, with_data=True, read_only=True) as m:
      meta = m.item_metadata(s)[STATE]["params"]
      sh = shardings
      if sh is None:
        sh = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      if isinstance(sh, jax.sharding.Sharding):  # one sharding for every parameter
        one = sh
        sh = jax.tree.map(lambda _: one, meta)
      abstract = jax.tree.map(
          lambda md, x: jax.ShapeDtypeStruct(md.shape, dtype or md.dtype, sharding=x), meta, sh)
      return m.restore(s, args=ocp.args.Composite(
          **{STATE: _restore_args({"params": abstract}, partial=True)}))[STATE]["params"]

  step, params = newest_readable(workdir, step, read)
  logging.info("Loaded parameters of step %d from %s", step, checkpoint_dir(workdir))
  return step, params


def newest_readable(workdir: str, step: int, read):
  """(step, read(step)) for the given step, or for step -1 the newest checkpoint `read` succeeds
  on. A checkpoint that fails (truncated or missing files: TensorStore OUT_OF_RANGE / NOT_FOUND)
  is reported with the reason and skipped; nothing is deleted."""
  if step >= 0:
    return step, read(pick_step(workdir, step))
  available = sorted(steps(workdir), reverse=True)
  if not available:
    raise FileNotFoundError(f"no checkpoints under {checkpoint_dir(workdir)}")
  failures = []
  for s in available:
    try:
      return s, read(s)
    except Exception as e:  # pylint: disable=broad-except (Orbax/TensorStore raise many types)
      reason = f"{type(e).__name__}: {_first_line(e)}"
      failures.append(f"step {s} ({reason})")
      older = [x for x in available if x < s]
      logging.warning("checkpoint %d in %s cannot be read (%s); %s", s, checkpoint_dir(workdir),
                      reason, f"trying step {older[0]}" if older else "no older checkpoint left")
  raise ValueError(f"no checkpoint under {checkpoint_dir(workdir)} can be read: "
                   + "; ".join(failures))


def _first_line(e: Exception) -> str:
  text = str(e).strip().split(". See full TensorStore details")[0].splitlines()
  cause = e.__cause__ or e.__context__  # TensorStore's own reason (OUT_OF_RANGE, NOT_FOUND, ...)
  detail = _first_line(cause) if cause is not None and cause is not e else ""
  line = (text[0] if text else "")[:200]
  return f"{line} ({detail})" if detail and detail not in line else line


DAMAGED_DIR = "checkpoints_damaged"


def set_aside(workdir: str, step: int) -> str:
  """Moves a damaged checkpoint out of checkpoints/ (so training can write that step again) to
  workdir/checkpoints_damaged/<step>; it is kept for the user to inspect, never deleted."""
  src = os.path.join(checkpoint_dir(workdir), str(step))
  dst_dir = os.path.join(os.path.abspath(workdir), DAMAGED_DIR)
  os.makedirs(dst_dir, exist_ok=True)
  dst, k = os.path.join(dst_dir, str(step)), 1
  while os.path.exists(dst):
    dst, k = os.path.join(dst_dir, f"{step}.{k}"), k + 1
  os.replace(src, dst)
  return dst


def restore_newest(workdir: str, manager: ocp.CheckpointManager, reopen, abstract_state: Any,
                   data_iter=None) -> tuple[Any, int, ocp.CheckpointManager]:
  """Resumes from the newest checkpoint that restores (train state and data iterator).

  Damaged newer checkpoints are reported, then set aside in workdir/checkpoints_damaged/ so the
  resumed run can write those steps again; nothing is deleted. `reopen()` makes a fresh manager
  (the old one has cached the step list). Returns (state, step, manager).
  """
  step, state = newest_readable(
      workdir, -1, lambda s: restore(manager, s, abstract_state, data_iter))
  damaged = [s for s in steps(workdir) if s > step]
  if damaged:
    manager.close()
    if jax.process_index() == 0:
      for s in damaged:
        logging.warning("moved the damaged checkpoint of step %d to %s (kept for you to inspect); "
                        "resuming from step %d", s, set_aside(workdir, s), step)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("llm_jax: damaged checkpoints set aside")
    manager = reopen()
  return state, step, manager
