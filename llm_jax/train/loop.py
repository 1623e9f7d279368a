"""The training loop shared by the pretrain, sft, dpo, distill and grpo jobs.

Online RL (grpo) differs only in where a step's batch comes from: a rollout stage
(llm_jax/rl/rollout.py, handed in by the job as `rollout_factory`, since train/ never imports
infer/) samples completions with the state's current parameters and scores them; its prompt
iterator takes the data iterator's place in checkpoints.

Order of work in one step: take the host batch, dispatch the jitted step (asynchronous), then
read the *previous* step's metrics, so the device never waits for the host to log. A
non-finite loss stops the run before any checkpoint of the bad state is written.
"""

import contextlib
import json
import os
import signal
import sys
import time
from typing import Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from llm_jax import checkpoint, console, devices, rundir, sharding, workdir_lock, xla_flags
from llm_jax.data import census, pipeline
from llm_jax.model import flops
from llm_jax.train import metrics as metrics_lib, optimizer as opt_lib
from llm_jax.train import lora_state, run_setup, state as state_lib, step as step_lib, writers
from llm_jax.train import evaluate, frozen as frozen_lib


class InputStalled(Exception):
  """Raised in the main thread when, after SIGTERM, the input pipeline still has not produced the
  next batch (a source that hangs: storage that stopped answering, a stuck loader thread)."""


class _Preemption:
  """Turns SIGTERM (a preempted VM, `kill`, a scheduler's time limit) into a flag the loop
  checks between steps, so the run saves and exits cleanly. A checkpoint being written then gets
  `config.checkpoint.sigterm_wait` seconds to finish (`deadline`); a second SIGTERM ends the wait
  at once.

  A SIGTERM that finds the loop waiting for its next batch gives the input pipeline
  `input_wait` seconds (config.checkpoint.sigterm_input_wait) to deliver it; then a SIGALRM
  raises InputStalled in the main thread, out of the wait (Python's lock and queue waits wake for
  signals), and the run stops without a new checkpoint: the data iterator cannot be saved in the
  middle of a read. Should the wait be one that Python signal handlers cannot interrupt,
  faulthandler's own C thread ends the process 30 s later, printing every thread's stack."""

  BACKSTOP_S = 30.0

  def __init__(self, input_wait: float = 5.0):
    self.requested = False
    self.at: Optional[float] = None  # time.monotonic() of the first SIGTERM
    self._input_wait = input_wait
    self._waiting = False  # in next(train_iter)
    self._armed = False  # the SIGALRM timer and the faulthandler backstop are set
    self._previous = None
    self._previous_alarm = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._previous_alarm = signal.signal(signal.SIGALRM, self._alarm)
    except ValueError:  # not the main thread (e.g. a notebook worker): nothing to install
      self._previous = None
    return self

  def _handle(self, signum, frame):
    if self.requested:
      logging.warning("SIGTERM again: stopping without waiting for the checkpoint in progress")
      self.at = float("-inf")
      if self._waiting:
        raise InputStalled()
      return
    self.requested, self.at = True, time.monotonic()
    if self._waiting:
      logging.warning("SIGTERM received while waiting for the next batch: saving a checkpoint "
                      "and stopping after this step if the data arrives within %g s, else "
                      "stopping without one", self._input_wait)
      self._arm()
    else:
      logging.warning("SIGTERM received: saving a checkpoint and stopping after this step")

  def _arm(self):
    import faulthandler  # pylint: disable=g-import-not-at-top
    self._armed = True
    signal.setitimer(signal.ITIMER_REAL, max(self._input_wait, 1e-3))
    faulthandler.dump_traceback_later(self._input_wait + self.BACKSTOP_S, exit=True)

  def _disarm(self):
    import faulthandler  # pylint: disable=g-import-not-at-top
    if self._armed:
      signal.setitimer(signal.ITIMER_REAL, 0)
      faulthandler.cancel_dump_traceback_later()
      self._armed = False

  def _alarm(self, signum, frame):
    if self._waiting:
      raise InputStalled()

  @contextlib.contextmanager
  def waiting_for_input(self):
    """Around next(train_iter): where a SIGTERM may end the wait (see the class docstring)."""
    self._waiting = True
    try:
      yield
    finally:
      self._waiting = False
      self._disarm()

  def deadline(self, wait_s: float) -> Optional[float]:
    """When waiting for a checkpoint must stop: `wait_s` after SIGTERM; None before one."""
    return None if self.at is None else self.at + wait_s

  def __exit__(self, *exc):
    self._disarm()
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      signal.signal(signal.SIGALRM, self._previous_alarm)


def _check_finite(step: int, scalars: dict, last_saved: Optional[int], workdir: str):
  bad = [k for k in ("loss", "grad_norm") if not np.isfinite(scalars[k])]
  if bad:
    where = (f"the last good checkpoint is step {last_saved} in {checkpoint.checkpoint_dir(workdir)}"
             if last_saved is not None else "no checkpoint was written")
    raise FloatingPointError(
        f"{' and '.join(bad)} became {scalars[bad[0]]} at step {step}; stopping ({where}). "
        "Lower config.train.lr, keep config.train.grad_clip > 0, or add config.train.z_loss.")


# Exit status of `python -m llm_jax.main` after SIGTERM (128 + SIGTERM, the shell's convention):
# the run saved a checkpoint and wants to be resumed; 0 means it finished.
PREEMPTED_EXIT_CODE = 143


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       batch_hook: Optional[Callable[[int, dict], None]] = None,
                       explicit: Sequence[str] = (),
                       rollout_factory: Optional[Callable] = None) -> dict:
  """Trains `config` in `workdir`, resuming from its latest readable checkpoint if there is one.

  batch_hook(step, host_batch) sees every batch before it is used (tests, debugging).
  explicit: config fields set on the command line ("model.dim", ...), which init_from must honour.
  rollout_factory(config, model_cfg, tokenizer, mesh, rules): the online-RL batch source (grpo).
  Returns the last step's metrics, every evaluation, "preempted" (stopped by SIGTERM),
  "abandoned_save" (the step of a checkpoint still being written when the wait after SIGTERM ran
  out, else None; see `exit_status`) and "input_stalled" (the steps done when, after SIGTERM, the
  data pipeline never delivered the next batch, else None) and "data" (per split, the examples
  kept whole, cut and dropped at seq_len, and the seq_len that keeps 95%: data/census.py); also
  written to final_metrics.json.

  The run holds `workdir`'s lock (workdir_lock.py) from before its first write to the end: a
  second writer of the same directory is refused before it does anything.
  """
  xla_flags.apply_config(config)  # before JAX starts its backend
  sharding.maybe_initialize_distributed()
  workdir = os.path.abspath(workdir)
  config = ml_collections.ConfigDict(config)  # never mutate the caller's config
  run_setup.check_workdir(workdir)
  with workdir_lock.hold(workdir, hint="use another --workdir", jax_processes=True):
    run_setup.preflight(config, workdir)
    return _train(config, workdir, batch_hook, explicit, rollout_factory)


def exit_status(result: dict) -> int:
  """The exit status of `python -m llm_jax.main` for a training result: 143 after SIGTERM, else
  0. If a checkpoint was given up after SIGTERM, Orbax's threads are still writing it and would
  hold the interpreter's exit until they finish or time out, so the process ends here; so it
  does when the input pipeline stalled (its threads never finish)."""
  code = PREEMPTED_EXIT_CODE if result.get("preempted") else 0
  if result.get("abandoned_save") is not None or result.get("input_stalled") is not None:
    # A stalled input pipeline's loader threads never return either (the interpreter would
    # join them forever), nor would its worker processes.
    import multiprocessing  # pylint: disable=g-import-not-at-top
    for child in multiprocessing.active_children():
      child.kill()
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access
  return code


def _train(config: ml_collections.ConfigDict, workdir: str,
           batch_hook: Optional[Callable[[int, dict], None]], explicit: Sequence[str],
           rollout_factory: Optional[Callable] = None) -> dict:
  tc = config.train
  resuming = bool(checkpoint.steps(workdir))
  if resuming:  # the run's own config.json fixes the model it has been training
    run_setup.check_resumable(config, workdir)
    _warn_schedule_change(config, workdir)
    run_setup.adopt_source_model(config, workdir)
  elif config.init_from:
    run_setup.adopt_source_model(config, config.init_from, explicit)
  tok = run_setup.resolve_tokenizer(config, workdir)
  model_cfg = run_setup.resolve_model(config, tok.vocab_size)
  model_cfg = lora_state.prepare(config, model_cfg, workdir, resuming)  # adapters if config.lora.rank
  rundir.write_config(workdir, config)

  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  optimizer = opt_lib.make_optimizer(tc)
  schedule = opt_lib.make_schedule(tc)
  # Shapes and shardings come from eval_shape, outside the mesh context (unboxing abstract
  # params under a set mesh would try to constrain them).
  abstract_state, state_sh = state_lib.state_shardings(model_cfg, optimizer, mesh, rules)
  objective = run_setup.objective_for(config, model_cfg)
  # Frozen trees (a DPO reference, a teacher) ride in the state but are never checkpointed.
  frozen_sh = frozen_lib.shardings(config, model_cfg, mesh, rules, state_sh["params"])
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(model_cfg, optimizer, schedule, grad_accum=tc.grad_accum,
                               objective=objective),
      {**state_sh, "frozen": frozen_sh} if frozen_sh else state_sh, mesh, rules)
  evaluator = evaluate.Evaluator(model_cfg, state_sh["params"], mesh, rules, objective=objective,
                                 frozen_shardings=frozen_sh or state_sh.get("frozen", {}))

  tokens_per_step = config.data.batch_size * config.data.seq_len
  # Before the data workers start: on a CPU the peak FLOP/s is measured, and busy workers
  # would make it read low.
  throughput = metrics_lib.Throughput(
      tokens_per_step, flops.flops_per_token(model_cfg, config.data.seq_len), model_cfg.dtype)
  logging.info("MFU is relative to a peak of %.3g TFLOP/s (%s)", throughput.peak / 1e12,
               throughput.peak_source)
  busy = devices.busy_note()
  if busy:
    logging.warning("%s", busy)
  data_counts = {}
  rollout = None
  if rollout_factory is not None:  # online RL: prompts in, scored completions out
    rollout = rollout_factory(config, model_cfg, tok, mesh, rules)
    train_iter = rollout.iterator(config.seed, jax.process_index(), jax.process_count())
  else:
    # What each split keeps and drops at this seq_len, said before any step (and in the result).
    for split in ("train", "eval"):
      counts = census.count(config.data, tok, split)
      if counts is not None:
        logging.info("%s", census.describe(counts))
        data_counts[split] = counts
    train_iter = pipeline.make_train_iterator(
        config.data, tok, seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count())
  manager = checkpoint.make_manager(workdir, keep=config.checkpoint.keep,
                                    async_save=config.checkpoint.async_save)

  with sharding.mesh_context(mesh, rules):
    if resuming:
      reopen = lambda: checkpoint.make_manager(workdir, keep=config.checkpoint.keep,
                                               async_save=config.checkpoint.async_save)
      state, _, manager = checkpoint.restore_newest(workdir, manager, reopen, abstract_state,
                                                    train_iter)
      if "frozen" in abstract_state:  # never checkpointed: the base is read again from init_from
        state["frozen"], _ = rundir.load_params(config.init_from, config.init_step,
                                                shardings=state_sh["frozen"],
                                                dtype=model_cfg.weight_dtype)
      logging.info("Resumed from step %d in %s", int(state["step"]),
                   checkpoint.checkpoint_dir(workdir))
    else:
      params = None
      if config.init_from:
        params, _ = rundir.load_params(config.init_from, config.init_step,
                                       shardings=state_sh.get("frozen", state_sh["params"]),
                                       dtype=model_cfg.weight_dtype)
        logging.info("Starting from the parameters of %s", config.init_from)
      state = state_lib.create_state(model_cfg, optimizer, jax.random.key(config.seed), state_sh,
                                     mesh, rules, params)
    if frozen_sh:
      state["frozen"] = frozen_lib.load(config, frozen_sh, model_cfg)
  start = int(state["step"])
  counts = flops.param_counts(state["frozen"] if model_cfg.lora else state["params"])
  if console.verbose():
    logging.info("Config:\n%s", config)
  logging.info("%s job: %s; the full config is in %s", config.job, _summary(config),
               os.path.join(workdir, rundir.CONFIG_FILE))
  logging.info("Model: %s parameters (%s without embeddings); mesh %s over %d devices (%s); "
               "%d tokens per step", f"{counts['total']:,}", f"{counts['non_embedding']:,}",
               dict(mesh.shape), jax.device_count(), jax.devices()[0].device_kind, tokens_per_step)
  if model_cfg.lora is not None:
    logging.info("%s", lora_state.summary(model_cfg, optimizer, abstract_state))

  writer = writers.create_writer(workdir, tc.steps, config.get("metrics"))
  writer.write_hparams(metrics_lib.flat_hparams(config))

  def run_eval(step):
    if rollout is not None and rollout.has_eval():
      with sharding.mesh_context(mesh, rules):
        scalars = rollout.evaluate(state)
      writer.write_scalars(step, scalars)
      eval_history.append({"step": step, **scalars})
      return scalars
    if not config.data.eval:
      return {}
    batches = pipeline.make_eval_iterator(config.data, tok, process_index=jax.process_index(),
                                          process_count=jax.process_count())
    with sharding.mesh_context(mesh, rules):
      res = evaluator(state["params"], state.get("frozen", {}), batches, tc.eval_batches)
    # The LM's headline figures; DPO and distillation report all of their own.
    shown = (("loss", "perplexity", "accuracy", "tokens", "documents", "batches")
             if evaluator.objective is None else None)
    scalars = {f"eval_{k}": v for k, v in res.items()
               if (k != "batches" or shown) and (shown is None or k in shown)}
    writer.write_scalars(step, scalars)
    eval_history.append({"step": step, **scalars})
    return scalars

  history, eval_history = {}, []
  if tc.eval_every and config.data.eval:
    logging.info("eval every %d steps on %s: %s (the eval job scores the whole set by default, "
                 "so its loss differs)", tc.eval_every, config.data.eval,
                 f"its first {tc.eval_batches} batches of {config.data.batch_size} x "
                 f"{config.data.seq_len} tokens, the same each time" if tc.eval_batches
                 else "all of it")
  if tc.eval_every and start == 0:
    history.update(run_eval(0))

  last_saved = start if resuming else None
  pending = None  # (step, device metrics) of the last dispatched step, read one step later
  last_scalars = {}
  # The first step compiles (seconds to minutes): said while it runs (console.Phase).
  compiling = console.Phase("compiling the train step (and running the first one)")

  def consume(pending) -> dict:
    """Reads a finished step's metrics: stops on non-finite values, logs every log_every."""
    done, m = pending
    scalars = metrics_lib.to_host(m)
    _check_finite(done, scalars, last_saved, workdir)
    if done % tc.log_every == 0 or done == tc.steps:
      scalars.update(throughput.report(done))
      if rollout is not None:  # where the time goes: sampling vs the train step
        scalars.update(rollout.throughput(scalars["step_time_s"], tokens_per_step))
      writer.write_scalars(done, scalars)
    return scalars

  step = start
  preempted = False
  saves = checkpoint.Saves(manager, workdir, watch=jax.process_count() == 1)
  sigterm_wait = float(config.checkpoint.get("sigterm_wait", 20.0))
  abandoned = None  # the step of a checkpoint given up after SIGTERM
  input_wait = float(config.checkpoint.get("sigterm_input_wait", 5.0))
  stalled = None  # the step whose batch never came after SIGTERM
  with _Preemption(input_wait) as preempt:
    deadline = lambda: preempt.deadline(sigterm_wait)
    error = None
    try:
      with sharding.mesh_context(mesh, rules):
        if step < tc.steps:
          compiling.start()
        while step < tc.steps:
          try:
            if rollout is not None:  # sampled now, with the parameters of this very state
              host_batch, rollout_metrics = rollout.batch(state, step, train_iter)
            else:
              with preempt.waiting_for_input():
                host_batch, rollout_metrics = next(train_iter), None
          except InputStalled:
            stalled = step
            kept = checkpoint.steps(workdir)
            logging.warning(
                "SIGTERM: the input pipeline gave no batch for step %d within %g s "
                "(config.checkpoint.sigterm_input_wait): a data source does not answer (hung "
                "storage, a stuck reader). Stopping without a new checkpoint (the data iterator "
                "cannot be saved in the middle of a read); the same command resumes from %s.",
                step + 1, input_wait, f"step {kept[-1]}" if kept else "the start")
            preempted = True
            break
          if batch_hook is not None:
            batch_hook(step, host_batch)
          t_train = time.perf_counter()
          state, m = train_step(state, sharding.to_global(host_batch, mesh, rules))
          if rollout is not None:
            # The next rollout waits for these parameters anyway, so waiting here costs nothing
            # and times the train step alone (train_tokens_per_s).
            jax.block_until_ready(m)
            rollout.add_train_time(time.perf_counter() - t_train)
            m = {**m, **rollout_metrics}
          step += 1
          if step == start + 1:
            jax.block_until_ready(m)
            compiling.finish()
            throughput.start(step)
          if pending is not None:
            last_scalars = consume(pending)
          pending = (step, m)
          saves.poll()  # a checkpoint that failed in the background stops the run now

          stop = preempt.requested or manager.reached_preemption(step)
          if stop and rollout is not None and step % rollout.mu:
            stop = False  # a rollout reused for several steps is finished before a save
          if config.checkpoint.enabled and (step % config.checkpoint.every == 0 or
                                            step == tc.steps or stop):
            last_scalars, pending = consume(pending), None  # never checkpoint a non-finite state
            if not saves.start(step, state, train_iter, deadline=deadline):
              abandoned = saves.pending  # the previous one, still unfinished after SIGTERM
              preempted = True
              break
            last_saved = step
          if tc.eval_every and (step % tc.eval_every == 0 or step == tc.steps):
            if pending is not None:  # report this step's throughput before the eval's time passes
              last_scalars, pending = consume(pending), None
            history.update(run_eval(step))
            throughput.start(step)  # eval time is not training time
          if stop:
            logging.warning("Stopped at step %d after SIGTERM; the same command resumes from "
                            "here.", step)
            preempted = True
            break
        if pending is not None:
          last_scalars = consume(pending)
    except BaseException as e:
      error = e
      raise
    finally:
      compiling.stop()  # an error in the first step: no counting line left running
      # Whatever stopped the loop (the end, SIGTERM, a non-finite loss, a bad record), a
      # checkpoint already started is finished before the process may exit; after SIGTERM only
      # for config.checkpoint.sigterm_wait seconds.
      try:
        abandoned = _finish_saves(saves, manager, deadline, error, workdir, sigterm_wait,
                                  abandoned)
      finally:
        writer.flush()
        writer.close()
  last_scalars.update(history)
  result = {"step": step, **last_scalars, "eval_history": eval_history, "preempted": preempted,
            "abandoned_save": abandoned, "input_stalled": stalled, "data": data_counts}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump(result, f, indent=2)
  logging.info("Done at step %d. Checkpoints: %s | TensorBoard: tensorboard --logdir %s",
               step, checkpoint.checkpoint_dir(workdir), os.path.join(workdir, "tensorboard"))
  busy = devices.busy_note()
  if busy:  # said again: the start may have been quiet
    logging.warning("%s", busy)
  return result


def _finish_saves(saves: checkpoint.Saves, manager, deadline, error, workdir: str,
                  sigterm_wait: float, abandoned: Optional[int]) -> Optional[int]:
  """Waits for the checkpoint in flight (until `deadline()`), then closes the manager. Returns the
  step of a checkpoint given up (the wait ran out after SIGTERM), else None. A failed save is
  raised, unless `error` is already on its way out (then it is logged)."""
  try:
    if abandoned is None and not saves.wait(deadline):
      abandoned = saves.pending
  except checkpoint.SaveFailed as e:
    if error is None:
      manager.close()
      raise
    logging.error("%s", e)
  if abandoned is not None:  # Orbax's threads still write it; close() would wait for them
    kept = checkpoint.steps(workdir)
    logging.warning("the checkpoint of step %d was still being written %.0f s after SIGTERM "
                    "(config.checkpoint.sigterm_wait); stopping without it. The same command "
                    "resumes from %s.", abandoned, sigterm_wait,
                    f"step {kept[-1]}" if kept else "the start")
    return abandoned
  try:
    manager.close()
  except Exception:  # pylint: disable=broad-except
    if error is None:
      raise
    logging.exception("closing the checkpoint manager after an error")
  return None


def _summary(config) -> str:
  m, d, t = config.model, config.data, config.train
  return (f"model dim {m.dim} x {m.n_layers} layers ({m.n_heads} heads, {m.n_kv_heads} kv), "
          f"{t.steps} steps of {d.batch_size} x {d.seq_len} tokens, lr {t.lr:g} ({t.schedule}), "
          + (f"prompts {config.grpo.prompts}, {config.grpo.num_generations} completions each"
             if config.job == "grpo" else
             f"train {d.train}" + (f", eval {d.eval}" if d.eval else ""))
          + (f", from {config.init_from}" if config.init_from else ""))


def _warn_schedule_change(config, workdir: str) -> None:
  """Resuming with other schedule settings recomputes the whole schedule: say what the learning
  rate does at the resume step, instead of jumping silently (e.g. raising train.steps restarts
  a cosine from a higher LR)."""
  saved = rundir.read_config(workdir).train
  fields = ("steps", "lr", "schedule", "warmup_steps", "min_lr_ratio")
  changed = [f for f in fields if f in saved and saved[f] != config.train[f]]
  if not changed:
    return
  at = max(checkpoint.steps(workdir))
  old_lr = float(opt_lib.make_schedule(ml_collections.ConfigDict(saved))(at))
  new_lr = float(opt_lib.make_schedule(config.train)(at))
  logging.warning("resuming with changed %s: the %s schedule is recomputed, so the learning rate "
                  "at step %d goes from %.3g to %.3g", ", ".join(
                      f"train.{f} ({saved[f]} -> {config.train[f]})" for f in changed),
                  config.train.schedule, at, old_lr, new_lr)
