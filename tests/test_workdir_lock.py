"""One writer per run directory (workdir_lock.py): a second writer (train, merge, eval outputs,
synth) is refused before it does any work, with one line naming the holder; a lock left by a
dead process is taken over with a message; the first writer's files stay whole."""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from llm_jax import checkpoint, rundir, workdir_lock
from tests.test_eval_job import _eval_cfg, _run, run_dir  # noqa: F401 (run_dir: a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = socket.gethostname()

# A process that holds a lock until it is killed.
_HOLDER = """
import sys, time
from llm_jax import workdir_lock
with workdir_lock.hold(sys.argv[1], name=sys.argv[2]):
  print("READY", flush=True)
  time.sleep(300)
"""


def _holder(directory: str, name: str = workdir_lock.LOCK_NAME) -> subprocess.Popen:
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER, directory, name], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  line = proc.stdout.readline()  # "" if it died
  assert line.strip() == "READY", proc.communicate(timeout=30)
  return proc


def _kill(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
  proc.send_signal(sig)
  proc.communicate(timeout=30)


def _dead_pid() -> int:
  proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True, timeout=60)
  pid = int(proc.stdout)
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)
  return pid


def _write_record(path: str, **fields) -> None:
  record = {"host": HOST, "pid": 1, "started": time.time() - 3600, "command": "python -m old"}
  record.update(fields)
  with open(path, "w") as f:
    f.write(json.dumps(record) + "\n")


def test_a_second_writer_is_refused_then_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
  d = str(tmp_path / "run")
  holder = _holder(d)
  lock_file = os.path.join(d, workdir_lock.LOCK_NAME)
  record = json.load(open(lock_file))
  assert (record["host"], record["pid"]) == (HOST, holder.pid)
  assert "-c" in record["command"] and record["started"] <= time.time()
  try:
    with pytest.raises(workdir_lock.Busy) as e:
      with workdir_lock.hold(d, hint="use another --workdir"):
        pytest.fail("a second writer got the lock")
    msg = str(e.value)
    assert msg.startswith(f"{d} is being written by pid {holder.pid} on host {HOST} since ")
    assert msg.endswith("; wait for it or use another --workdir") and "\n" not in msg
    assert e.value.exit_code == 75
    assert json.load(open(lock_file)) == record  # the holder's record is untouched
  finally:
    _kill(holder)  # kill -9: no cleanup; the kernel drops its flock, its record stays
  assert json.load(open(lock_file))["pid"] == holder.pid
  with caplog.at_level(logging.WARNING):
    with workdir_lock.hold(d):
      assert json.load(open(lock_file))["pid"] == os.getpid()
  assert f"took over the lock of pid {holder.pid} on host {HOST}" in caplog.text
  assert "no longer running" in caplog.text
  assert not os.path.exists(lock_file)  # removed on a clean exit


def test_a_stale_record_of_a_pid_that_no_longer_exists_is_taken_over(tmp_path, caplog):
  d = tmp_path / "run"
  d.mkdir()
  pid = _dead_pid()
  _write_record(str(d / workdir_lock.LOCK_NAME), pid=pid)
  with caplog.at_level(logging.WARNING):
    with workdir_lock.hold(str(d)):
      pass
  assert f"took over the lock of pid {pid} on host {HOST}" in caplog.text


def test_one_process_cannot_hold_a_directory_twice(tmp_path):
  with workdir_lock.hold(str(tmp_path)):
    with pytest.raises(workdir_lock.Busy, match="being written by this same process"):
      with workdir_lock.hold(str(tmp_path)):
        pass
  with workdir_lock.hold(str(tmp_path)):  # released: free again
    pass


def test_another_hosts_record_is_kept_until_it_goes_stale(tmp_path, caplog):
  """flock cannot be trusted across hosts on every filesystem: a record of another host is
  honoured while its holder refreshes it, and taken over once it has not for STALE_AFTER_S."""
  path = str(tmp_path / workdir_lock.LOCK_NAME)
  _write_record(path, host="other-host", pid=4242, command="python -m llm_jax.main --x")
  with pytest.raises(workdir_lock.Busy, match=r"pid 4242 on host other-host .*python -m "
                     r"llm_jax.main --x\).*delete .*\.llm_jax\.lock or wait 10 min"):
    with workdir_lock.hold(str(tmp_path)):
      pass
  old = time.time() - workdir_lock.STALE_AFTER_S - 60
  os.utime(path, (old, old))
  with caplog.at_level(logging.WARNING):
    with workdir_lock.hold(str(tmp_path)):
      pass
  assert "took over the lock of pid 4242 on host other-host" in caplog.text


# --- two trainers on one workdir -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
  from tests.test_loop import small_config  # pylint: disable=g-import-not-at-top
  from llm_jax.data import pipeline, tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  d = str(tmp_path_factory.mktemp("tok"))
  cfg = small_config("")
  tok_lib.get_tokenizer(cfg.data.tokenizer, d, lambda: pipeline.corpus_texts(cfg.data))
  return os.path.join(d, "tokenizer.model")


def _train_cmd(workdir: str, tokenizer: str) -> list[str]:
  """A tiny SFT run (tests/test_loop.py's small_config) that goes on until it is stopped."""
  fields = {"model.dim": 32, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2,
            "model.mlp_dim": 64, "data.seq_len": 64, "data.batch_size": 4,
            "data.synthetic.n_entities": 40, "data.tokenizer.path": tokenizer,
            "train.steps": 1_000_000, "train.warmup_steps": 2, "train.log_every": 50,
            "train.eval_every": 0, "checkpoint.every": 10, "checkpoint.keep": 3}
  return ([sys.executable, "-m", "llm_jax.main", "--config=configs/sft.py", f"--workdir={workdir}"]
          + [f"--config.{k}={v}" for k, v in fields.items()])


def test_two_trainers_on_one_workdir(tmp_path, tokenizer_path):
  wd = str(tmp_path / "sft")
  os.makedirs(wd)
  dead = _dead_pid()  # a trainer killed earlier left its lock behind: the first takes it over
  _write_record(os.path.join(wd, workdir_lock.LOCK_NAME), pid=dead)
  log = open(tmp_path / "first.log", "w+")  # a file, not a pipe nobody reads while it runs
  first = subprocess.Popen(_train_cmd(wd, tokenizer_path), cwd=ROOT, stdout=log, stderr=log)
  try:
    deadline = time.time() + 240
    while len(checkpoint.steps(wd)) < 2:  # the first is in its loop, saving
      assert first.poll() is None, open(log.name).read()[-3000:]
      assert time.time() < deadline, "the first trainer wrote no checkpoint"
      time.sleep(0.2)
    config_json = open(os.path.join(wd, rundir.CONFIG_FILE), "rb").read()
    second = subprocess.run(_train_cmd(wd, tokenizer_path), cwd=ROOT, capture_output=True,
                            text=True, timeout=180)
    assert first.poll() is None, "the first trainer stopped"
  finally:
    first.send_signal(signal.SIGTERM)  # saves and exits 143
    first.wait(timeout=120)
    log.close()
  first_err = open(log.name).read()

  assert second.returncode == 75, second.stderr[-3000:]
  line = second.stderr.strip().splitlines()[-1]
  assert line.startswith(f"error: {wd} is being written by pid {first.pid} on host {HOST} since ")
  assert "(python -m llm_jax.main --config=configs/sft.py" in line
  assert line.endswith("; wait for it or use another --workdir")
  assert "Traceback" not in second.stderr
  assert open(os.path.join(wd, rundir.CONFIG_FILE), "rb").read() == config_json

  assert first.returncode == 143, first_err[-3000:]
  assert f"took over the lock of pid {dead} on host {HOST}" in first_err
  names = sorted(os.listdir(checkpoint.checkpoint_dir(wd)))
  assert all(n.isdigit() for n in names), names  # no half-written checkpoint left behind
  steps = checkpoint.steps(wd)
  assert len(steps) == 3 and steps[:2] == [steps[1] - 10, steps[1]], steps  # none skipped
  for s in steps:  # every kept checkpoint is whole
    step, params = checkpoint.restore_params(wd, s)
    assert step == s and params
  assert not os.path.exists(os.path.join(wd, workdir_lock.LOCK_NAME))


def test_readers_skip_a_checkpoint_being_written(tmp_path, run_dir):
  """A reader (chat, serve, eval, export) takes no lock: it lists and reads only finished
  checkpoints, whatever `<step>.orbax-checkpoint-tmp` a writer has in progress."""
  wd = str(tmp_path / "run")
  shutil.copytree(run_dir, wd)
  ckpt = checkpoint.checkpoint_dir(wd)
  partial = os.path.join(ckpt, "40.orbax-checkpoint-tmp")
  shutil.copytree(os.path.join(ckpt, "30"), partial)
  for root, _, files in os.walk(partial):
    for f in files:  # half written
      os.truncate(os.path.join(root, f), os.path.getsize(os.path.join(root, f)) // 2)
  with workdir_lock.hold(wd):  # as if a trainer were writing it now
    assert checkpoint.steps(wd) == [10, 20, 30]
    step, params = checkpoint.restore_params(wd)
    assert step == 30 and params
    params, config = rundir.load_params(wd)
    assert params and config.model.dim == 32


# --- synth ----------------------------------------------------------------------------------------


def test_two_synth_runs_on_one_out(tmp_path):
  from tests.synth_stub import MODEL, StubServer  # pylint: disable=g-import-not-at-top
  from tests.test_synth_resume import _docs, _ledger_chunks  # pylint: disable=g-import-not-at-top
  docs = _docs(tmp_path / "docs.jsonl")
  out = str(tmp_path / "qa.jsonl")

  def cmd(url):
    return [sys.executable, "-m", "llm_jax.data.synth", f"--docs={docs}", f"--base_url={url}",
            f"--model={MODEL}", f"--out={out}", "--concurrency=2", "--backoff=0.001",
            "--fsync=false"]

  # DOC05's first request takes 60 s: the first run stays busy while the second starts.
  with StubServer(script={"DOC05": [{"sleep": 60, "auto": True}, {"auto": True}]},
                  delay=0.01) as server:
    first = subprocess.Popen(cmd(server.base_url), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
      deadline = time.time() + 60
      while _ledger_chunks(out) < 4:
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.time() < deadline, "the first synth run made no progress"
        time.sleep(0.05)
      size = os.path.getsize(out)
      second = subprocess.run(cmd(server.base_url), cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
      assert first.poll() is None, "the first synth run stopped"
      assert os.path.getsize(out) >= size  # nothing cut off
    finally:
      first.send_signal(signal.SIGINT)  # commits what it has and exits 130
      first.communicate(timeout=60)

  assert second.returncode == 75, second.stderr[-3000:]
  line = second.stderr.strip().splitlines()[-1]
  assert line.startswith(f"error: {out} is being written by pid {first.pid} on host {HOST}")
  assert "-m llm_jax.data.synth" in line and line.endswith("wait for it or use another --out")
  assert first.returncode == 130
  with open(out, "rb") as f:
    raw = f.read()
  assert raw.endswith(b"\n")
  records = [json.loads(line) for line in raw.split(b"\n")[:-1]]  # no torn line
  assert len(records) >= 4 * 3
  assert not os.path.exists(os.path.join(tmp_path, "qa.lock"))


# --- merge and eval outputs -----------------------------------------------------------------------


def test_merge_lora_out_is_locked(tmp_path, caplog):
  from llm_jax.convert import merge_lora  # pylint: disable=g-import-not-at-top
  from llm_jax.data.tokenizer import train_sentencepiece  # pylint: disable=g-import-not-at-top
  from tests.test_lora_convert import CORPUS, _make_runs  # pylint: disable=g-import-not-at-top
  tok = train_sentencepiece(CORPUS, vocab_size=300, model_type="bpe")
  _, lora_dir, *_ = _make_runs(str(tmp_path), tok, "llama", "q,v")
  out = str(tmp_path / "merged")
  holder = _holder(out)
  try:
    with pytest.raises(workdir_lock.Busy, match=f"pid {holder.pid} .*use another --out$"):
      merge_lora.merge_run(lora_dir, out)
    assert sorted(os.listdir(out)) == [workdir_lock.LOCK_NAME]  # nothing written
  finally:
    _kill(holder)
  with caplog.at_level(logging.WARNING):
    assert merge_lora.merge_run(lora_dir, out) == out
  assert f"took over the lock of pid {holder.pid}" in caplog.text
  assert checkpoint.steps(out) == [30] and not os.path.exists(
      os.path.join(out, workdir_lock.LOCK_NAME))


def test_eval_outputs_are_locked_and_a_trainer_does_not_block_them(tmp_path, run_dir):
  eval_run = run_dir
  out = str(tmp_path / "out")
  cfg = _eval_cfg(eval__tasks="loss", eval__steps="30", eval__out_dir=out, eval__max_batches=1,
                  eval__plots=False)
  holder = _holder(out, workdir_lock.EVAL_LOCK_NAME)
  try:
    with pytest.raises(workdir_lock.Busy,
                       match=f"pid {holder.pid} .*use another config.eval.out_dir$"):
      _run(cfg, eval_run)
    assert not os.path.exists(os.path.join(out, "eval_30.json"))
  finally:
    _kill(holder)
  with workdir_lock.hold(eval_run):  # a trainer writing the run: the eval still runs
    results = _run(cfg, eval_run)
  assert results[30]["loss"] > 0 and os.path.exists(os.path.join(out, "eval_30.json"))
