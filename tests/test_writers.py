"""TensorBoard without TensorFlow: the tensorboard package's event writer (train/writers.py) writes
what clu's TensorFlow SummaryWriter writes. The events are read back with tensorboard's own
event-file loader, not with any code of the writers."""

import glob
import os
import subprocess
import sys
import time

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


def read_wandb_run(workdir: str) -> list[dict]:
  """Every offline W&B run under workdir/wandb, oldest first: {"id", "project", "name", "config",
  "history": {(key, step): value}}, read from the run-<id>.wandb files with a reader of their
  format written here (LevelDB's log format: 32 KiB blocks of records with a 7-byte header,
  after the file's own 7-byte header; each record a wandb_internal_pb2.Record), not with
  anything of the writer or of wandb's own run code."""
  import json
  import struct
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  runs = []
  for path in sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))):
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", path
    pos, block, buf = 7, 32768, b""
    run = {"config": {}, "history": {}, "exited": False}
    while pos + 7 <= len(data):
      if block - pos % block < 7:  # a block's tail too short for a header is padding
        pos += block - pos % block
        continue
      _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
      if kind == 0 and length == 0:
        break
      buf = (b"" if kind in (1, 2) else buf) + data[pos + 7:pos + 7 + length]
      pos += 7 + length
      if kind not in (1, 4):  # FULL or LAST completes a record
        continue
      rec = wandb_internal_pb2.Record.FromString(buf)
      key = lambda item: item.key or ".".join(item.nested_key)
      kind_of = rec.WhichOneof("record_type")
      if kind_of == "run":
        run.update(id=rec.run.run_id, project=rec.run.project, name=rec.run.display_name)
        run["config"].update({key(i): json.loads(i.value_json) for i in rec.run.config.update})
      elif kind_of == "config":
        run["config"].update({key(i): json.loads(i.value_json) for i in rec.config.update})
      elif kind_of == "exit":
        run["exited"] = True
      elif kind_of == "history":
        items = {key(i): json.loads(i.value_json) for i in rec.history.item}
        step = items.pop("_step")
        run["history"].update({(k, step): v for k, v in items.items() if not k.startswith("_")})
    runs.append(run)
  return runs


def finished_wandb_runs(workdir: str, n: int = 1, timeout: float = 120) -> list[dict]:
  """read_wandb_run once n runs have their exit record: wandb-core, a process of its own, may
  still be writing the file when run.finish() has returned (seen on a loaded machine)."""
  deadline = time.time() + timeout
  while True:
    runs = read_wandb_run(workdir)
    if (len(runs) == n and all(r["exited"] for r in runs)) or time.time() > deadline:
      return runs
    time.sleep(0.5)


def test_wandb_writer_logs_the_scalars_tensorboard_gets_offline(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  metrics = sft_config.get_config().metrics
  metrics.wandb_project = "llm_jax-test"
  writer = writers.create_writer(str(tmp_path), 6, metrics)
  hparams = {"train.lr": 3e-3, "model.dim": 32, "job": "sft"}
  writer.write_hparams(hparams)
  for step in (2, 4, 6):
    writer.write_scalars(step, {"loss": np.float32(1.0 / step), "learning_rate": 1e-3 * step,
                                "tokens": step * 100})
  writer.write_texts(6, {"sample": "第一"})  # TensorBoard's only
  writer.flush()
  writer.close()
  (run,) = finished_wandb_runs(str(tmp_path))
  assert run["project"] == "llm_jax-test" and run["name"] == os.path.basename(tmp_path)
  assert {k: run["config"].get(k) for k in hparams} == hparams, run["config"]
  tb = {k: v for k, (plugin, v) in read_events(str(tmp_path / "tensorboard")).items()
        if plugin == "scalars"}
  assert sorted(run["history"]) == sorted(tb)  # the same (tag, step) pairs
  for key, value in tb.items():
    assert run["history"][key] == pytest.approx(value, rel=1e-6), key


def test_wandb_project_without_wandb_stops_before_any_work(tmp_path, monkeypatch):
  from llm_jax import packages
  from llm_jax.train import run_setup
  monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, as where it is absent
  config = sft_config.get_config()
  config.metrics.wandb_project = "my-project"
  with pytest.raises(packages.MissingPackage, match=r"wandb .*pip install wandb==0\.31\.0"):
    run_setup.preflight(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.slow
def test_training_with_wandb_offline_logs_every_scalar_and_resumes_the_same_run(tmp_path,
                                                                                monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  config = sft_config.get_config()
  for path, value in TINY_RUN.items():
    fields.set_path(config, path, value)
  config.metrics.wandb_project = "llm_jax-test"
  wd = str(tmp_path / "run")
  loop.train_and_evaluate(config, wd)
  config.train.steps = 8  # resumed from step 6
  loop.train_and_evaluate(config, wd)
  first, second = finished_wandb_runs(wd, 2)
  assert first["id"] == second["id"]  # the resumed run continues the same W&B run
  history = {**first["history"], **second["history"]}
  tb = {k: v for k, (plugin, v) in read_events(os.path.join(wd, "tensorboard")).items()
        if plugin == "scalars"}
  assert {"loss", "learning_rate", "eval_loss"} <= {tag for tag, _ in tb}
  assert sorted(history) == sorted(tb)
  for key, value in tb.items():
    assert history[key] == pytest.approx(value, rel=1e-6), key
