"""Weights & Biases: a clu MetricWriter that logs the scalars the console and TensorBoard get, when
`config.metrics.wandb_project` is set and the `wandb` package is installed (optional; the job
stops before any work with the pip command when it is not, train/run_setup.py preflight).

The W&B run lives in the work directory (`<workdir>/wandb/`): WANDB_MODE=offline (or `wandb
offline`) keeps it there for `wandb sync` later; a resumed training run continues the same W&B
run (its id is kept in `<workdir>/wandb/llm_jax_run_id`). The hyperparameters go to the run's
config; texts, images and histograms stay TensorBoard's.
"""

from __future__ import annotations

import os
import secrets
import string

import numpy as np
from clu.metric_writers import interface

from llm_jax import packages

RUN_ID_FILE = "llm_jax_run_id"


class WandbWriter(interface.MetricWriter):
  """Scalars to `wandb.log(..., step=step)`; hparams to the run's config."""

  def __init__(self, workdir: str, project: str, entity: str = "", name: str = ""):
    packages.require("wandb")
    import wandb  # pylint: disable=g-import-not-at-top
    wandb_dir = os.path.join(workdir, "wandb")
    os.makedirs(wandb_dir, exist_ok=True)
    id_path = os.path.join(wandb_dir, RUN_ID_FILE)
    if os.path.exists(id_path):
      with open(id_path, encoding="utf-8") as f:
        run_id = f.read().strip()
    else:
      # W&B's ids: 8 characters of [a-z0-9], unique within the project.
      run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
      with open(id_path, "w", encoding="utf-8") as f:
        f.write(run_id + "\n")
    self._run = wandb.init(project=project, entity=entity or None,
                           name=name or os.path.basename(os.path.abspath(workdir)),
                           dir=workdir, id=run_id, resume="allow")

  @property
  def run(self):
    return self._run

  def write_scalars(self, step, scalars):
    self._run.log({k: float(np.asarray(v)) for k, v in scalars.items()}, step=int(step))

  def write_hparams(self, hparams):
    self._run.config.update(dict(hparams), allow_val_change=True)

  # Only scalars and hparams go to W&B (as to the console); the rest is TensorBoard's.
  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def flush(self):
    pass

  def close(self):
    self._run.finish()
