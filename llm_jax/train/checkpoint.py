"""Orbax checkpointing: the one module that touches the Orbax API (it renames often).

A run directory holds:
  config.json              the run's full config
  tokenizer.model | tokenizer/   the tokenizer the run trained or was given
  checkpoints/<step>/state  {"step", "params", "opt_state"} (params-only for imported models)
  checkpoints/<step>/data   the Grain iterator state, so a resumed run sees the same batches
Orbax writes each step to a temporary directory and renames it when complete, so a crash
mid-save never leaves a half-written checkpoint that looks valid.
"""

import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

STATE = "state"
DATA = "data"
CONFIG_FILE = "config.json"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, *, keep: int = 3, async_save: bool = True,
                 with_data: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager over workdir/checkpoints with items "state" (and "data")."""
  if read_only:
    options = ocp.CheckpointManagerOptions(
        read_only=True, create=False, save_interval_steps=0, max_to_keep=None)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save)
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
  """Starts saving `state` (and the data iterator's position); returns whether it saved."""
  # Frozen trees (train/frozen.py) are re-read from their source run, never saved.
  state = {k: v for k, v in state.items() if k != "frozen"} if isinstance(state, dict) else state
  args = {STATE: ocp.args.PyTreeSave(state)}
  if data_iter is not None:
    args[DATA] = grain.checkpoint.CheckpointSave(data_iter)
  return manager.save(step, args=ocp.args.Composite(**args), force=force)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iter=None) -> Any:
  """Restores the train state into the shardings of `abstract_state` (ShapeDtypeStructs with
  .sharding) and, if given, moves `data_iter` to where the checkpointed run stopped."""
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


def write_config(workdir: str, config: ml_collections.ConfigDict) -> str:
  """Writes config.json from process 0 (the file is the same on every process)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)  # atomic: a reader never sees half a config
  return path


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found: {workdir!r} is not an llm_jax run directory (expected config.json "
        "and checkpoints/ written by a training job or by llm_jax.convert.hf_import)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


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


def save_params(workdir: str, params: Any, config: ml_collections.ConfigDict, step: int = 0) -> str:
  """Writes config.json and a params-only checkpoint that any job can start from
  (`config.init_from=<workdir>`). Used by the Hugging Face importer."""
  write_config(workdir, config)
  with make_manager(workdir, keep=1, async_save=False, with_data=False) as m:
    save(m, step, {"step": step, "params": params}, force=True)
    m.wait_until_finished()
  logging.info("Wrote parameters of step %d to %s", step, checkpoint_dir(workdir))
  return workdir


def load_params(workdir: str, step: int = -1, shardings: Any = None, dtype: Any = None
                ) -> tuple[Any, ml_collections.ConfigDict]:
  """Reads only the parameters of a run's checkpoint (no optimizer state).

  `shardings`: a tree of NamedShardings matching the params; None puts them on one device.
  `dtype`: cast every parameter to it while reading (e.g. bf16 imports trained in float32).
  Returns (params, the run's config).
  """
  config = read_config(workdir)
  step = pick_step(workdir, step)
  # The data item's handler is registered (though not restored) so Orbax knows the item.
  with make_manager(workdir, with_data=True, read_only=True) as m:
    meta = m.item_metadata(step)[STATE]["params"]
    if shardings is None:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      shardings = jax.tree.map(lambda _: device, meta)
    abstract = jax.tree.map(
        lambda md, s: jax.ShapeDtypeStruct(md.shape, dtype or md.dtype, sharding=s), meta, shardings)
    restored = m.restore(step, args=ocp.args.Composite(
        **{STATE: _restore_args({"params": abstract}, partial=True)}))
  logging.info("Loaded parameters of step %d from %s", step, checkpoint_dir(workdir))
  return restored[STATE]["params"], config


def tokenizer_path(workdir: str, config: ml_collections.ConfigDict) -> str:
  """Where a run's tokenizer lives: its own copy if it has one, else the configured path."""
  for name in ("tokenizer.model", "tokenizer"):
    p = os.path.join(workdir, name)
    if os.path.exists(p):
      return p
  return config.data.tokenizer.path
