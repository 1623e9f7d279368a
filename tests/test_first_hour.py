"""What a new user meets first: mistakes answered by one line naming the field or file and the
fix, before any work starts (no tokenizer trained, nothing compiled), and no traceback."""

import os
import subprocess
import sys

import pytest

from llm_jax import jobs
from tests.conftest import ROOT, tiny_sft_config


def _refused(config, workdir, error, match):
  with pytest.raises(error, match=match):
    jobs.run(config, str(workdir))
  if os.path.isdir(workdir):  # checked before the tokenizer was trained or anything compiled
    assert not [f for f in os.listdir(workdir) if not f.startswith(".")], os.listdir(workdir)


def test_workdir_that_is_a_file(tmp_path):
  f = tmp_path / "run"
  f.write_text("not a directory")
  _refused(tiny_sft_config(), f, NotADirectoryError, r"--workdir=.*run is a file")


def test_workdir_that_cannot_be_created(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  _refused(tiny_sft_config(), blocker / "run", PermissionError, r"--workdir=.*is not writable")


@pytest.mark.parametrize("make, match", [
    (lambda d: d, r"is a directory; name the files in it"),
    (lambda d: d / "missing.jsonl", r"missing.jsonl' does not exist"),
    (lambda d: (d / "gbk.jsonl").write_bytes('{"text": "中文"}\n'.encode("gbk")) and d / "gbk.jsonl",
     r"gbk.jsonl:1: not UTF-8 text"),
    (lambda d: (d / "obj.json").write_text('{"data": [{"text": "x"}]}') and d / "obj.json",
     r"obj.json:1: .*records are under 'data'"),
    (lambda d: (d / "data.csv").write_text("a,b\n") and d / "data.csv", r"data.csv': unknown extension"),
])
def test_bad_data_files(tmp_path, make, match):
  data = tmp_path / "data"
  data.mkdir()
  config = tiny_sft_config()
  config.data.train = str(make(data))
  _refused(config, tmp_path / "run", (ValueError, OSError), match)


def test_init_from_that_is_not_a_run(tmp_path):
  config = tiny_sft_config()
  config.init_from = str(tmp_path)
  _refused(config, tmp_path / "run", FileNotFoundError, r"is not an llm_jax run directory")


def test_init_from_with_a_shape_it_cannot_honour(trained_sft_run, tmp_path):
  config = tiny_sft_config()
  config.init_from = trained_sft_run
  config.model.dim = 256
  with pytest.raises(ValueError, match=r"config.model.dim=256: config.init_from=.* model.dim=64"):
    jobs.run(config, str(tmp_path / "run"), explicit={"model.dim"})


def _main(*args, devices=1):
  return subprocess.run([sys.executable, "-m", "llm_jax.main", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu",
                                 XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"))


def test_cli_batch_not_divisible_by_devices_is_one_line(tmp_path):
  run = tmp_path / "run"
  out = _main("--config=configs/sft.py", f"--workdir={run}", "--config.data.batch_size=12", devices=8)
  assert out.returncode == 1
  assert "Traceback" not in out.stderr, out.stderr
  errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert errors == ["error: config.data.batch_size=12 does not split over the 8 data-parallel devices "
                    "(config.mesh: data x fsdp); use a multiple of 8, or set config.mesh so that data "
                    "x fsdp divides it."], out.stderr
  assert not os.path.exists(run / "tokenizer.model")


def test_cli_resume_with_another_tokenizer_is_one_line(trained_sft_run, tmp_path):
  tok = tmp_path / "tok"
  out = subprocess.run([sys.executable, "-m", "llm_jax.data.train_tokenizer",
                        "--input=builtin:bios", "--vocab_size=1000", f"--out={tok}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  out = _main("--config=configs/sft.py", f"--workdir={trained_sft_run}",
              f"--config.data.tokenizer.path={tok}/tokenizer.model", "--config.model.vocab_size=0",
              "--config.model.dim=64", "--config.model.n_layers=2", "--config.model.mlp_dim=128")
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert [l for l in out.stderr.splitlines() if l.startswith("error:")][0].startswith(
      "error: config.data.tokenizer.path=")
  assert "another --workdir" in out.stderr


def test_inspect_marks_exactly_the_trained_tokens(tmp_path):
  from llm_jax.data import preview, tokenizer as tok_lib
  data = tmp_path / "alpaca.jsonl"
  data.write_text('{"instruction": "Translate to French", "input": "Good morning", "output": "Bonjour"}\n')
  config = tiny_sft_config()
  config.data.train = str(data)
  tok = tok_lib.train_sentencepiece(["Translate to French Good morning Bonjour"] * 50, vocab_size=300)
  [(where, fmt, ids, w)] = list(preview.examples(config, tok, "train", 5))
  assert where == f"{data}:1" and fmt == "alpaca"
  # Alpaca: instruction and input joined by a newline in the user turn; the loss on the reply only.
  assert preview.render(tok, ids, w, color=False) == (
      "<|im_start|>user\nTranslate to French\nGood morning<|im_end|>\n"
      "<|im_start|>assistant\n«Bonjour<|im_end|>»\n")
