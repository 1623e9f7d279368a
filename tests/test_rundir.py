"""The run directory has one reader (llm_jax/rundir.py): one rule for a run's context, which chat,
the eval job and the server all report alike, for a trained run and for an imported Hugging Face
model; and the lineage that rule follows back through `init_from`."""

import json
import os
import re
import shutil
import subprocess
import sys

import httpx2 as httpx
import pytest

from configs import base, eval as eval_config
from llm_jax import rundir
from llm_jax.convert import hf_export, hf_import
from llm_jax.eval import job
from llm_jax.serve import app as app_lib, server
from tests.conftest import ROOT


def _run_dir(path, seq_len=None, init_from="", hf_mpe=None):
  """A run directory as far as context_length reads it: config.json (and hf_config.json)."""
  os.makedirs(path, exist_ok=True)
  config = {"job": "sft", "init_from": init_from, "data": {}}
  if seq_len is not None:
    config["data"]["seq_len"] = seq_len
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  if hf_mpe is not None:
    with open(os.path.join(path, "hf_config.json"), "w") as f:
      json.dump({"max_position_embeddings": hf_mpe}, f)
  return str(path)


def test_context_is_the_longest_sequence_the_weights_were_trained_on(tmp_path):
  scratch = _run_dir(tmp_path / "scratch", seq_len=256)
  assert rundir.context_length(scratch) == 256
  # An import's own seq_len is only the importer's default: its model's limit counts.
  imported = _run_dir(tmp_path / "hf", seq_len=512, hf_mpe=2048)
  assert rundir.context_length(imported) == 2048
  shorter = _run_dir(tmp_path / "sft", seq_len=256, init_from=imported)
  assert rundir.context_length(shorter) == 2048
  longer = _run_dir(tmp_path / "long", seq_len=4096, init_from=imported)
  assert rundir.context_length(longer) == 4096  # trained beyond its source: its own length
  # Two hops (DPO <- SFT <- import) still reach the import (the old rules looked one hop).
  dpo = _run_dir(tmp_path / "dpo", seq_len=128, init_from=shorter)
  assert rundir.context_length(dpo) == 2048
  pretrained = _run_dir(tmp_path / "pre", seq_len=1024)
  assert rundir.context_length(_run_dir(tmp_path / "after", seq_len=256, init_from=pretrained)) == 1024
  # A source that is gone ends the walk; a loop of init_from ends it too.
  assert rundir.context_length(_run_dir(tmp_path / "orphan", 300, str(tmp_path / "gone"))) == 300
  a = _run_dir(tmp_path / "a", seq_len=64, init_from=str(tmp_path / "b"))
  _run_dir(tmp_path / "b", seq_len=96, init_from=a)
  assert rundir.context_length(a) == 96
  with pytest.raises(ValueError, match="records no data.seq_len"):
    rundir.context_length(_run_dir(tmp_path / "none"))
  assert rundir.training_lineage(dpo) == ["sft: ?", "sft: ?", "sft: ?"]


def _chat_context(workdir) -> int:
  out = subprocess.run([sys.executable, "-m", "llm_jax.chat", f"--workdir={workdir}"],
                       input="/quit\n", capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  return int(re.search(r"context (\d+) tokens", out.stdout).group(1))


def _eval_context(workdir, out_dir) -> int:
  fields = {"eval.tasks": "loss", "eval.steps": "latest", "eval.max_batches": 1,
            "eval.plots": False, "eval.out_dir": str(out_dir),
            "data.eval": "builtin:bios_qa_heldout", "data.batch_size": 8, "data.seq_len": 64}
  config = eval_config.get_config()
  for path, value in fields.items():
    section, name = path.split(".")
    config[section][name] = value
  (result,) = job.run_eval(config, workdir, explicit=set(fields)).values()
  return result["context"]


def _server_context(workdir, db_path) -> int:
  model = server.load_model(workdir, n_slots=1)
  with server.BackgroundServer(app_lib.create_app([model], db_path=str(db_path))) as s:
    (card,) = httpx.get(s.url + "/v1/models", timeout=60).json()["data"]
  assert card["max_model_len"] == model.context
  return card["max_model_len"]


def test_chat_eval_and_server_report_the_same_context(trained_sft_run, tmp_path):
  """A trained run (context: its seq_len, 128), a Hugging Face import (its
  max_position_embeddings, 320, not the importer's default seq_len), and a run trained from the
  import on longer rows (400, where chat used to say 320 and the server 400)."""
  hf_dir = str(tmp_path / "hf")
  hf_export.export_hf(trained_sft_run, hf_dir)
  with open(os.path.join(hf_dir, "config.json")) as f:
    hf = json.load(f)
  hf["max_position_embeddings"] = 320
  with open(os.path.join(hf_dir, "config.json"), "w") as f:
    json.dump(hf, f)
  imported = str(tmp_path / "imported")
  hf_import.import_hf(hf_dir, imported, base.get_config())
  longer = str(tmp_path / "longer")  # the import's weights, as if trained on again at 400 tokens
  shutil.copytree(imported, longer)
  os.remove(os.path.join(longer, rundir.HF_SOURCE_CONFIG))
  config = rundir.read_config(longer)
  config.init_from, config.data.seq_len = imported, 400
  rundir.write_config(longer, config)

  for workdir, want in ((trained_sft_run, 128), (imported, 320), (longer, 400)):
    reported = {"rundir": rundir.context_length(workdir), "chat": _chat_context(workdir),
                "eval": _eval_context(workdir, tmp_path / "eval" / os.path.basename(workdir)),
                "server": _server_context(workdir, tmp_path / "arena.sqlite")}
    assert reported == dict.fromkeys(reported, want), (workdir, reported)
