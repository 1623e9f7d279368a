"""clu metric writers: readable console lines on every process, TensorBoard on process 0.

TensorBoard events are written by one of two backends, chosen in `tensorboard_backend()`:
clu's own SummaryWriter where TensorFlow imports (clu writes through `tf.summary`), else
`EventFileWriter` below, a clu MetricWriter over the `tensorboard` package's own event-file writer
(the one `torch.utils.tensorboard` uses). Both write the same tags in the same form (scalars as
float32 tensor summaries of the scalars plugin, the hparams session-start summary, text), so
`tensorboard --logdir` and `llm_jax.eval.curves` read either alike. Without TensorFlow, event
files go to local directories only (a `gs://` workdir logs to the console alone, with a warning).
With config.metrics.wandb_project set, the same scalars also go to Weights & Biases
(wandb_writer.py).
"""

import functools
import os
import sys
import time
import types

import jax
import numpy as np
from absl import logging

from llm_jax.train.metrics import format_eval_line, format_line, format_lm_eval_line


@functools.lru_cache(maxsize=None)
def _tensorflow():
  """TensorFlow, or None where it does not import (not installed, or broken)."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except  # ImportError, or a broken install
    logging.info("TensorFlow does not import (%s: %s): TensorBoard events are written by the "
                 "tensorboard package's event writer", type(e).__name__, e)
    return None
  # TensorFlow only writes event files here: keep it off the GPU/TPU so it takes no memory JAX
  # needs (TF grabs all GPU memory by default).
  tf.config.set_visible_devices([], "GPU")
  return tf


def tensorboard_backend() -> str:
  """"tensorflow" (clu's SummaryWriter) or "tensorboard" (EventFileWriter): the one place the
  choice is made."""
  return "tensorflow" if _tensorflow() is not None else "tensorboard"


def _clu_metric_writers():
  """clu.metric_writers, importable with or without TensorFlow.

  clu's package __init__ imports its TensorFlow SummaryWriter eagerly, so without TensorFlow the
  package (and with it the MetricWriter interface, MultiWriter and AsyncWriter, which need no
  TensorFlow) would not import. There a stand-in module takes the SummaryWriter module's place:
  its SummaryWriter says what to use instead.
  """
  name = "clu.metric_writers.summary_writer"
  if "clu.metric_writers" not in sys.modules and _tensorflow() is None and name not in sys.modules:
    stand_in = types.ModuleType(name, "Stand-in for clu's TensorFlow SummaryWriter (llm_jax).")

    class SummaryWriter:  # pylint: disable=too-few-public-methods

      def __init__(self, *args, **kwargs):
        raise ImportError("clu's SummaryWriter writes through TensorFlow, which does not import "
                          "here; llm_jax.train.writers.EventFileWriter writes the same events")

    stand_in.SummaryWriter = SummaryWriter
    sys.modules[name] = stand_in
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  return metric_writers


metric_writers = _clu_metric_writers()
interface = metric_writers.interface


def _local(path: str) -> bool:
  return "://" not in path or path.startswith("file://")


def create_writer(workdir: str, total_steps: int, metrics=None) -> metric_writers.MultiWriter:
  """Console lines on every process; TensorBoard events, and W&B where `metrics.wandb_project`
  (config.metrics) is set, on process 0."""
  writers = [ConsoleWriter(total_steps)]
  if jax.process_index() == 0 and metrics is not None and metrics.get("wandb_project"):
    from llm_jax.train import wandb_writer  # pylint: disable=g-import-not-at-top  # optional package
    writers.append(wandb_writer.WandbWriter(workdir, metrics.wandb_project,
                                            metrics.get("wandb_entity", ""),
                                            metrics.get("wandb_name", "")))
  if jax.process_index() == 0:
    logdir = os.path.join(workdir, "tensorboard")
    if tensorboard_backend() == "tensorflow":
      writers.append(metric_writers.AsyncWriter(metric_writers.SummaryWriter(logdir)))
    elif _local(logdir):
      writers.append(metric_writers.AsyncWriter(EventFileWriter(logdir)))
    else:
      logging.warning("no TensorBoard events for %s: without TensorFlow they are written to local "
                      "directories only (pip install tensorflow-cpu for remote ones)", logdir)
  return metric_writers.MultiWriter(writers)


class EventFileWriter(interface.MetricWriter):
  """TensorBoard event files through the `tensorboard` package alone (no TensorFlow), in the
  form clu's SummaryWriter gives them: scalars as float32 tensors of the scalars plugin, hparams
  as the HParams plugin's session-start summary at step 0, text and histograms by their
  plugins' `*_pb` builders. Images, videos and audio are not written (one warning)."""

  def __init__(self, logdir: str):
    from tensorboard.summary.writer import event_file_writer  # pylint: disable=g-import-not-at-top
    os.makedirs(logdir, exist_ok=True)
    self._writer = event_file_writer.EventFileWriter(logdir)

  def _add(self, step: int, summary) -> None:
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def write_scalars(self, step, scalars):
    from tensorboard.plugins.scalar import summary_v2 as scalar  # pylint: disable=g-import-not-at-top
    for key, value in scalars.items():
      self._add(step, scalar.scalar_pb(key, np.asarray(value)))

  def write_summaries(self, step, values, metadata=None):
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
    for key, value in values.items():
      summary = summary_pb2.Summary()
      entry = summary.value.add(tag=key, tensor=tensor_util.make_tensor_proto(np.asarray(value)))
      md = metadata.get(key) if metadata is not None else None
      if md is not None:
        entry.metadata.CopyFrom(md)
      self._add(step, summary)

  def write_texts(self, step, texts):
    from tensorboard.plugins.text import summary_v2 as text  # pylint: disable=g-import-not-at-top
    for key, value in texts.items():
      self._add(step, text.text_pb(key, value))

  def write_histograms(self, step, arrays, num_buckets=None):
    from tensorboard.plugins.histogram import summary_v2 as histogram  # pylint: disable=g-import-not-at-top
    for key, value in arrays.items():
      buckets = None if num_buckets is None else num_buckets.get(key)
      self._add(step, histogram.histogram_pb(key, np.asarray(value), buckets=buckets))

  def write_hparams(self, hparams):
    from clu.internal import utils as clu_utils  # pylint: disable=g-import-not-at-top
    from tensorboard.plugins.hparams import summary_v2 as hp  # pylint: disable=g-import-not-at-top
    self._add(0, hp.hparams_pb(dict(clu_utils.flatten_dict(hparams))))

  def _unsupported(self, what):
    logging.log_first_n(logging.WARNING, "EventFileWriter (no TensorFlow) does not write %s", 1,
                        what)

  def write_images(self, step, images):
    self._unsupported("images")

  def write_videos(self, step, videos):
    self._unsupported("videos")

  def write_audios(self, step, audios, *, sample_rate):
    self._unsupported("audio")

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


class ConsoleWriter(interface.MetricWriter):
  """One line per report, with units. (clu's LoggingWriter prints raw `key=value` lists and the
  whole hparams dict; the config is logged once at the start instead.)"""

  def __init__(self, total_steps: int):
    self.total_steps = total_steps

  def write_scalars(self, step, scalars):
    if any(k.startswith("eval_") for k in scalars) and "eval_tokens" not in scalars:
      # DPO, distillation: the objective's own eval metrics (the LM eval reports eval_tokens)
      logging.info(format_eval_line(step, scalars))
    elif any(k.startswith("eval_") for k in scalars):
      logging.info("%s", format_lm_eval_line(step, scalars))
    else:
      logging.info(format_line(step, self.total_steps, scalars))

  # Only scalars go to the console.
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

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass
