"""TensorBoard without TensorFlow: the tensorboard package's event writer (train/writers.py) writes
what clu's TensorFlow SummaryWriter writes. The events are read back with tensorboard's own
event-file loader, not with any code of the writers."""

import glob
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import sft as sft_config
from llm_jax import fields
from llm_jax.train import loop, writers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_TF = os.path.join(ROOT, "tests", "hide_packages")  # its sitecustomize hides TensorFlow


def read_events(logdir: str) -> dict:
  """{(tag, step): (plugin, value)} of every summary in logdir's event files: scalars as floats,
  text as str, hparams as {name: value}."""
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.hparams import plugin_data_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  out = {}
  files = sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))
  assert files, f"no event file in {logdir}"
  for path in files:
    for event in event_file_loader.EventFileLoader(path).Load():
      for v in event.summary.value:
        plugin = v.metadata.plugin_data.plugin_name
        if plugin == "hparams":
          data = plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
          value = {k: getattr(x, x.WhichOneof("kind"))
                   for k, x in data.session_start_info.hparams.items()}
        else:
          array = tensor_util.make_ndarray(v.tensor)
          value = array.item() if array.dtype != object else array.item().decode()
          if plugin == "scalars":
            assert array.dtype == np.float32 and array.shape == (), (v.tag, array)
        out[(v.tag, int(event.step))] = (plugin, value)
  return out


def test_event_file_writer_writes_what_clus_summary_writer_writes(tmp_path):
  pytest.importorskip("tensorflow")
  from clu.metric_writers import SummaryWriter  # pylint: disable=g-import-not-at-top
  hparams = {"train.lr": 3e-3, "model.dim": 32, "job": "sft", "model.scan_layers": True}
  for name, writer in (("tf", SummaryWriter(str(tmp_path / "tf"))),
                       ("tb", writers.EventFileWriter(str(tmp_path / "tb")))):
    writer.write_hparams(hparams)
    for step in (1, 5, 10):
      writer.write_scalars(step, {"loss": 1.0 / step, "lr": np.float32(0.1 * step), "tokens": step})
    writer.write_texts(10, {"sample": "第一 sample"})
    writer.flush()
    writer.close()
  tf_events, tb_events = read_events(str(tmp_path / "tf")), read_events(str(tmp_path / "tb"))
  assert tf_events == tb_events
  assert tb_events[("loss", 5)] == ("scalars", pytest.approx(0.2))
  assert tb_events[("_hparams_/session_start_info", 0)] == ("hparams", hparams)
  assert tb_events[("sample", 10)] == ("text", "第一 sample")


# A tiny SFT run: 6 steps, metrics every 2, one evaluation at the end.
TINY_RUN = {"model.dim": 32, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2,
            "model.mlp_dim": 64, "data.seq_len": 64, "data.batch_size": 4,
            "data.synthetic.n_entities": 40, "data.tokenizer.vocab_size": 600, "train.steps": 6,
            "train.warmup_steps": 2, "train.log_every": 2, "train.eval_every": 6,
            "train.eval_batches": 1, "checkpoint.every": 6}
# Wall-clock figures: the same tags and steps in both runs, their values differ.
TIMED = {"tokens_per_s", "mfu", "step_time_s", "seconds_per_step"}


def test_training_without_tensorflow_writes_the_same_scalars(tmp_path):
  """`python -m llm_jax.main` where `import tensorflow` fails writes events whose scalars equal
  those of the same run with TensorFlow (clu's SummaryWriter): same tags, steps and values."""
  pytest.importorskip("tensorflow")
  assert writers.tensorboard_backend() == "tensorflow"
  config = sft_config.get_config()
  for path, value in TINY_RUN.items():
    fields.set_path(config, path, value)
  loop.train_and_evaluate(config, str(tmp_path / "with_tf"))

  env = dict(os.environ, PYTHONPATH=os.pathsep.join([NO_TF, ROOT]), HIDE_PACKAGES="tensorflow",
             JAX_PLATFORMS="cpu")
  args = [f"--config.{k}={v}" for k, v in TINY_RUN.items()]
  out = subprocess.run([sys.executable, "-m", "llm_jax.main", "--config=configs/sft.py",
                        f"--workdir={tmp_path / 'without_tf'}", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Done at step 6" in out.stderr

  with_tf = read_events(str(tmp_path / "with_tf" / "tensorboard"))
  without = read_events(str(tmp_path / "without_tf" / "tensorboard"))
  assert sorted(with_tf) == sorted(without)  # the same (tag, step) pairs
  tags = {tag for tag, _ in with_tf}
  assert {"loss", "learning_rate", "eval_loss", "_hparams_/session_start_info"} <= tags, tags
  assert {step for tag, step in with_tf if tag == "loss"} == {2, 4, 6}
  for key, (plugin, value) in with_tf.items():
    other_plugin, other = without[key]
    assert plugin == other_plugin, key
    if key[0] in TIMED:
      continue
    if plugin == "hparams":  # the same, but for paths inside the two work directories
      moved = {k: v.replace("without_tf", "with_tf") if isinstance(v, str) else v
               for k, v in other.items()}
      assert value == moved
    else:
      assert value == pytest.approx(other, rel=1e-6, abs=1e-7), key
