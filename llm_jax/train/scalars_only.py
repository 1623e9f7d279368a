"""The base of the writers that take scalars only (the console, W&B)."""


class ScalarsOnly:
  """Mixin of a clu MetricWriter that takes scalars (and hparams) only: every other kind of
  summary is TensorBoard's, so the console and W&B writers drop them here. (No clu import here:
  writers.py imports clu in its own way, where TensorFlow is absent.)"""

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
