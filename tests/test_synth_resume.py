"""llm_jax.data.synth resumes after SIGKILL and Ctrl-C: the output then equals an uninterrupted
run's (as a set of pairs), with no duplicate and no torn line, and at most the requests in
flight are asked again."""

import collections
import json
import os
import signal
import subprocess
import sys
import time

from llm_jax.data.synth import client as client_lib
from llm_jax.data.synth import documents
from llm_jax.data.synth import run as run_lib
from tests.synth_stub import MODEL, StubServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_DOCS = 24
CONCURRENCY = 2


def _docs(path) -> str:
  with open(path, "w", encoding="utf-8") as f:
    for n in range(N_DOCS):
      f.write(json.dumps({"text": f"DOC{n:02d} The lake Omega{n:02d} lies north of Delta{n:02d}. "
                                  f"It is {n + 3} kilometres long. Fishing there began in 17{n:02d}."})
              + "\n")
  return str(path)


def _cli(docs, out, base_url):
  return [sys.executable, "-m", "llm_jax.data.synth", f"--docs={docs}", f"--base_url={base_url}",
          f"--model={MODEL}", f"--out={out}", "--paraphrases=1", f"--concurrency={CONCURRENCY}",
          "--backoff=0.001", "--fsync=false"]


def _ledger_chunks(out) -> int:
  path = os.path.splitext(out)[0] + ".ledger.jsonl"
  if not os.path.exists(path):
    return 0
  with open(path, "rb") as f:
    return max(0, f.read().count(b"\n") - 1)  # minus the settings line


def _interrupt_midway(cmd, out, sig, after_chunks: int) -> subprocess.CompletedProcess:
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while _ledger_chunks(out) < after_chunks:
    assert proc.poll() is None, proc.communicate()
    assert time.time() < deadline, "the run made no progress"
    time.sleep(0.02)
  proc.send_signal(sig)
  stdout, stderr = proc.communicate(timeout=60)
  return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _key(record):
  m = record["metadata"]
  return (record["messages"][-2]["content"], record["messages"][-1]["content"], m["doc_id"],
          m["chunk_id"], m.get("paraphrase_of"))


def test_sigkill_and_ctrl_c_then_rerun_equal_an_uninterrupted_run(tmp_path):
  docs = _docs(tmp_path / "docs.jsonl")
  reference = tmp_path / "reference.jsonl"
  out = str(tmp_path / "qa.jsonl")
  with StubServer(delay=0.03) as server:
    cfg = run_lib.SynthConfig(
        docs=documents.DocOptions(paths=(docs,)), chunks=documents.ChunkSpec(),
        endpoint=client_lib.EndpointConfig(base_url=server.base_url, model=MODEL, backoff=0.001),
        out=str(reference), paraphrases=1, concurrency=CONCURRENCY, fsync=False)
    run_lib.run(cfg)
    server.counts.clear()

    killed = _interrupt_midway(_cli(docs, out, server.base_url), out, signal.SIGKILL, 6)
    assert killed.returncode == -signal.SIGKILL
    done_at_kill = _ledger_chunks(out)
    assert done_at_kill < N_DOCS, "the run finished before the kill; slow the stub down"

    stopped = _interrupt_midway(_cli(docs, out, server.base_url), out, signal.SIGINT,
                                done_at_kill + 6)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "synth: interrupted (rerun the same command to continue)" in stopped.stdout

    finished = subprocess.run(_cli(docs, out, server.base_url), cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "not done" not in finished.stdout and f"{N_DOCS} chunks" in finished.stdout
    qa_requests = sum(v for k, v in server.counts.items() if "/" not in k)

  with open(out, "rb") as f:
    raw = f.read()
  assert raw.endswith(b"\n")
  lines = raw.split(b"\n")[:-1]
  records = [json.loads(line) for line in lines]  # every line whole
  expected = [json.loads(line) for line in open(reference, "rb")]
  assert len(records) == len(expected) == N_DOCS * 3 * 2  # 3 pairs + 1 paraphrase each
  assert len(set(lines)) == len(lines)  # no duplicate
  assert collections.Counter(map(_key, records)) == collections.Counter(map(_key, expected))
  # Each interruption loses at most the requests then in flight: their chunks are asked again.
  assert N_DOCS <= qa_requests <= N_DOCS + 2 * CONCURRENCY
  ledger = [json.loads(l) for l in open(os.path.splitext(out)[0] + ".ledger.jsonl", "rb")][1:]
  assert sorted(e["chunk"] for e in ledger) == sorted(f"docs.jsonl:{n}/0" for n in range(N_DOCS))
