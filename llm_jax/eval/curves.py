"""Training curves from a run's TensorBoard events: the scalars the loop wrote (loss, eval_loss,
learning_rate, tokens_per_s, mfu, ...) read back as arrays, and drawn for several runs on shared
axes (the notebooks' matplotlib curves; `tensorboard --logdir` shows the same events).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from llm_jax.eval import plots


def read_scalars(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{tag: (steps, values)} of every scalar in `workdir`/tensorboard, sorted by step. A resumed
  run writes a second event file and may log a step again; the later value wins."""
  # TensorBoard's reader, not TensorFlow's: a plain reader of the event files clu writes.
  from tensorboard.backend.event_processing import event_accumulator as ea  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "tensorboard")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} not found: {workdir} is not a training run directory (or it "
                            "has not logged a step yet)")
  acc = ea.EventAccumulator(path, size_guidance={ea.TENSORS: 0, ea.SCALARS: 0})
  acc.Reload()
  tags = acc.Tags()
  points: dict[str, dict[int, float]] = {}
  for tag in tags.get("tensors", []):  # TF2 summaries (clu's SummaryWriter) are tensors
    for e in acc.Tensors(tag):
      value = tensor_util.make_ndarray(e.tensor_proto)
      if value.ndim == 0 and np.issubdtype(value.dtype, np.number):
        points.setdefault(tag, {})[int(e.step)] = float(value)
  for tag in tags.get("scalars", []):  # TF1-style simple values, should any writer use them
    for e in acc.Scalars(tag):
      points.setdefault(tag, {})[int(e.step)] = float(e.value)
  out = {}
  for tag, by_step in points.items():
    steps = sorted(by_step)
    out[tag] = (np.asarray(steps, np.int64), np.asarray([by_step[s] for s in steps], np.float64))
  return out


# What the loop's scalars are, for the panels' titles and y-axes (other tags show as they are).
TAGS = {
    "loss": ("training loss", "loss (nats per token)"),
    "eval_loss": ("eval loss", "loss (nats per token)"),
    "eval_perplexity": ("eval perplexity", "perplexity (exp of the loss)"),
    "eval_accuracy": ("eval token accuracy", "share of tokens right (0-1)"),
    "accuracy": ("training token accuracy", "share of tokens right (0-1)"),
    "learning_rate": ("learning rate", "learning rate"),
    "grad_norm": ("gradient norm", "global L2 norm (before clipping)"),
    "tokens_per_s": ("throughput", "tokens per second"),
    "mfu": ("model FLOPs utilisation", "share of the peak (0-1)"),
    "step_time_s": ("step time", "seconds per step"),
    "padding_share": ("padding", "share of padding tokens (0-1)"),
}


def plot_runs(runs: dict[str, str], tags: Sequence[str], path: str, title: str = "") -> str:
  """One panel per tag, one line per run ({label: workdir}); a run without a tag is left out of
  that panel. Written to `path` (PNG); returns it."""
  curves = {label: read_scalars(wd) for label, wd in runs.items()}
  missing = [t for t in tags if not any(t in c for c in curves.values())]
  if missing:
    known = sorted(set().union(*curves.values()))
    raise ValueError(f"no run logged {missing}; logged tags: {known}")
  plots.warn_if_cjk([title, *tags, *runs])
  fig, axes = plots.panel_grid(len(tags), width=4.2, height=3.0)
  for ax, tag in zip(axes, tags):
    for label, c in curves.items():
      if tag in c:
        steps, values = c[tag]
        ax.plot(steps, values, marker="o" if len(steps) < 12 else None, markersize=3,
                linewidth=1.5, label=label)
    name, unit = TAGS.get(tag, (tag, tag))
    plots.style_panel(ax, name, "training step")
    ax.set_ylabel(unit, fontsize=8)
    ax.set_xlim(left=0)
    if len(curves) > 1:
      ax.legend(fontsize=7)
  return plots.save(fig, path, title)
