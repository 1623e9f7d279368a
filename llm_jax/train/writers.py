"""clu metric writers: readable console lines on every process, TensorBoard on process 0.

Importing this module imports TensorFlow (clu writes TensorBoard event files through it), so
only the training loop imports it.
"""

import os

import jax
import tensorflow as tf
from absl import logging
from clu import metric_writers
from clu.metric_writers import interface

from llm_jax.train.metrics import format_eval_line, format_line


def create_writer(workdir: str, total_steps: int) -> metric_writers.MultiWriter:
  # TensorFlow only writes event files here: keep it off the GPU/TPU so it takes no memory JAX
  # needs (TF grabs all GPU memory by default).
  tf.config.set_visible_devices([], "GPU")
  writers = [ConsoleWriter(total_steps)]
  if jax.process_index() == 0:
    writers.append(metric_writers.AsyncWriter(
        metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))))
  return metric_writers.MultiWriter(writers)


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
      logging.info("eval at step %d: loss %.4f | perplexity %.2f | accuracy %.3f (%d tokens)",
                   step, scalars["eval_loss"], scalars["eval_perplexity"],
                   scalars["eval_accuracy"], scalars.get("eval_tokens", 0))
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
