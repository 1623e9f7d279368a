"""End to end: QA chats from 50 real Chinese Wikipedia paragraphs (../shared/data, optional),
written by `python -m llm_jax.data.synth` through an OpenAI-compatible endpoint, then a few
SFT steps on them with `python -m llm_jax.main --config=configs/sft.py`.

The endpoint is tests/synth_stub.py (answers are sentences of the paragraph, rephrasings
prefix the question): a model that writes usable pairs. The same command against llm_jax's own
server is tests/test_serve.py::test_synth_talks_to_this_server (a tiny model: the contract, not
the quality).
"""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from tests.synth_stub import MODEL, StubServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIKI = os.path.join(ROOT, "..", "shared", "data", "zh_wiki", "zh_wiki_paragraphs.jsonl")


@pytest.mark.skipif(not os.path.isfile(WIKI), reason="../shared/data/zh_wiki not present")
def test_zh_wiki_paragraphs_to_qa_to_sft(tmp_path):
  out = tmp_path / "qa.jsonl"
  with StubServer() as server:
    synth = subprocess.run(
        [sys.executable, "-m", "llm_jax.data.synth", f"--docs={WIKI}", "--max_docs=50",
         f"--base_url={server.base_url}", f"--model={MODEL}", f"--out={out}", "--paraphrases=1",
         "--chunk_size=400", "--chunk_overlap=60", "--doc_id_field=title", "--split_by=document", "--val_fraction=0.2", "--fsync=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert synth.returncode == 0, synth.stderr[-3000:]
  assert "synth: finished" in synth.stdout and "50 documents" in synth.stdout
  summary = json.load(open(tmp_path / "qa.summary.json"))
  assert summary["chunks_gave_up"] == 0 and summary["chunks_rejected"] == 0
  assert summary["requests"]["qa"] == summary["chunks_total"] > 50  # long paragraphs: 2+ chunks
  train = [json.loads(l) for l in open(tmp_path / "qa.train.jsonl", encoding="utf-8")]
  val = [json.loads(l) for l in open(tmp_path / "qa.val.jsonl", encoding="utf-8")]
  assert len(train) > 100 and len(val) > 10
  assert not {r["metadata"]["doc_id"] for r in train} & {r["metadata"]["doc_id"] for r in val}
  # The prompts were Chinese (auto language) and the answers come from the paragraphs.
  assert all(r["metadata"]["grounding"] >= 0.6 for r in train + val)

  run = tmp_path / "sft"
  sft = subprocess.run(
      [sys.executable, "-m", "llm_jax.main", "--config=configs/sft.py", f"--workdir={run}",
       f"--config.data.train={tmp_path / 'qa.train.jsonl'}", "--config.data.eval=",
       "--config.train.steps=5", "--config.train.warmup_steps=1", "--config.train.log_every=1",
       "--config.data.seq_len=128", "--config.data.batch_size=4", "--config.model.n_layers=1",
       "--config.data.tokenizer.vocab_size=2048"],
      cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert sft.returncode == 0, sft.stderr[-3000:]
  final = json.load(open(run / "final_metrics.json"))
  assert final["step"] == 5 and final["trained_tokens"] > 0  # assistant tokens carried the loss
  losses = [float(x) for x in re.findall(r"step \d+/5 \| loss ([0-9.]+)", sft.stderr)]
  assert len(losses) == 5 and all(math.isfinite(x) for x in losses)
  assert losses[-1] < losses[0]  # it learned from the generated chats
