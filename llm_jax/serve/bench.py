"""Load benchmark of the server: concurrent streaming chat clients against random-weight runs.

  python -m llm_jax.serve.bench
  python -m llm_jax.serve.bench --models=tiny --clients=1,8 --requests_per_client=2

For each model shape it writes a run directory (random weights, a SentencePiece tokenizer trained
on the embedded encyclopedia), starts `python -m llm_jax.serve` on it as a separate process (on a
free 127.0.0.1 port, every shape compiled first), and runs 1, 8, 32 and 100 concurrent clients.
Each client sends `requests_per_client` streaming chat requests one after the other (questions of
the encyclopedia, `max_tokens` tokens each: `ignore_eos`, as random weights would stop anywhere)
and records the time to its first content chunk. Printed, never asserted: requests/s, output
tokens/s, p50/p99 time to first token, and errors. The load generator shares the machine with
the server, as it would on a laptop.
"""

import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time


from absl import flags
import numpy as np

from llm_jax import console

_MODELS = flags.DEFINE_list("models", ["tiny", "minimind-26m"], "Model presets of configs/models.py.")
_CLIENTS = flags.DEFINE_list("clients", ["1", "8", "32", "100"], "Concurrent clients, one level each.")
_REQUESTS = flags.DEFINE_integer("requests_per_client", 2, "Requests each client sends, one after the other.")
_MIN_REQUESTS = flags.DEFINE_integer("min_requests", 16, "At least this many requests per level.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "Tokens generated per request.")
_SLOTS = flags.DEFINE_integer("slots", 32, "The server's --slots.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "The runs' context (config.data.seq_len).")
_VOCAB = {"tiny": 4096, "minimind-26m": 6400}


def make_run(preset: str, root: str) -> str:
  """A run directory with random weights of `preset` and a tokenizer trained on the encyclopedia."""
  from configs import base  # pylint: disable=g-import-not-at-top
  from llm_jax.data.builtin import bios  # pylint: disable=g-import-not-at-top
  from llm_jax.data.chat_template import render_chat_text  # pylint: disable=g-import-not-at-top
  from llm_jax.data.tokenizer import train_sentencepiece  # pylint: disable=g-import-not-at-top
  from llm_jax.infer.measure import random_params  # pylint: disable=g-import-not-at-top
  from llm_jax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from llm_jax import rundir  # pylint: disable=g-import-not-at-top

  workdir = os.path.join(root, preset)
  config = base.get_config(preset)
  data = bios.generate(config.data.synthetic)
  texts = [r["text"] for r in data["bios"]] + [render_chat_text(r["messages"]) for r in data["qa_train"][:4000]]
  tok = train_sentencepiece(texts, vocab_size=_VOCAB.get(preset, 4096))
  os.makedirs(workdir, exist_ok=True)
  tok.save(workdir)
  config.data.seq_len = _SEQ_LEN.value
  config.model.vocab_size = tok.vocab_size
  cfg = ModelConfig.from_config(config.model)
  rundir.save_params(workdir, random_params(cfg), config, step=0)
  return workdir


def questions() -> list[str]:
  from configs import base  # pylint: disable=g-import-not-at-top
  from llm_jax.data.builtin import bios  # pylint: disable=g-import-not-at-top
  data = bios.generate(base.get_config().data.synthetic)
  return [r["messages"][-2]["content"] if r["messages"][-1]["role"] == "assistant" else r["messages"][-1]["content"]
          for r in data["qa_heldout"][:512]]


def start_server(workdir: str) -> tuple[subprocess.Popen, str]:
  proc = subprocess.Popen([sys.executable, "-m", "llm_jax.serve", f"--workdir={workdir}:bench", "--port=0",
                           f"--slots={_SLOTS.value}", f"--db={os.path.join(workdir, 'arena.sqlite')}"],
                          stdout=subprocess.PIPE, text=True)
  for line in proc.stdout:
    if "page: " in line:
      return proc, line.split("page: ")[1].strip().rstrip("/")
  raise RuntimeError(f"the server exited with {proc.wait()}")


async def one_request(http, url: str, question: str, max_tokens: int) -> dict:
  body = {"model": "bench", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
          "temperature": 0.8, "top_p": 0.95, "stream": True, "stream_options": {"include_usage": True},
          "ignore_eos": True}
  start = time.perf_counter()
  first, tokens = None, 0
  try:
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as resp:
      if resp.status_code != 200:
        return {"error": f"HTTP {resp.status_code}"}
      async for line in resp.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
          continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
          tokens = chunk["usage"]["completion_tokens"]
        for c in chunk.get("choices", []):
          if first is None and c["delta"].get("content"):
            first = time.perf_counter() - start
  except Exception as e:  # pylint: disable=broad-except
    return {"error": f"{type(e).__name__}: {e}"}
  return {"ttft": first, "tokens": tokens, "latency": time.perf_counter() - start}


async def load_level(url: str, clients: int, per_client: int, qs: list[str], max_tokens: int) -> dict:
  import httpx2 as httpx  # pylint: disable=g-import-not-at-top  (installed with the openai client)
  total = max(clients * per_client, _MIN_REQUESTS.value)
  todo = list(range(total))
  results = []
  limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
  async with httpx.AsyncClient(timeout=600, limits=limits) as http:
    async def client():
      while todo:
        i = todo.pop()
        results.append(await one_request(http, url, qs[i % len(qs)], max_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - start
  ok = [r for r in results if "error" not in r]
  ttft = np.array([r["ttft"] for r in ok if r["ttft"] is not None])
  return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok),
          "req_per_s": len(ok) / elapsed, "tok_per_s": sum(r["tokens"] for r in ok) / elapsed,
          "ttft_p50": float(np.percentile(ttft, 50)) if ttft.size else float("nan"),
          "ttft_p99": float(np.percentile(ttft, 99)) if ttft.size else float("nan"),
          "first_error": next((r["error"] for r in results if "error" in r), "")}


def main():
  qs = questions()
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
             platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
  print(f"machine: {os.cpu_count()} CPU cores ({cpu}); load average before: {os.getloadavg()[0]:.2f}")
  print(f"each request: a chat question, {_MAX_TOKENS.value} generated tokens (streamed); server --slots="
        f"{_SLOTS.value}, context {_SEQ_LEN.value}")
  with tempfile.TemporaryDirectory() as root:
    for preset in _MODELS.value:
      workdir = make_run(preset, root)
      t0 = time.perf_counter()
      proc, url = start_server(workdir)
      print(f"\n{preset}: server ready in {time.perf_counter() - t0:.0f} s (load + compile)")
      print(f"  {'clients':>7} {'requests':>8} {'req/s':>7} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
            f"{'errors':>6}")
      try:
        for clients in (int(c) for c in _CLIENTS.value):
          r = asyncio.run(load_level(url, clients, _REQUESTS.value, qs, _MAX_TOKENS.value))
          print(f"  {r['clients']:7d} {r['requests']:8d} {r['req_per_s']:7.2f} {r['tok_per_s']:9.1f} "
                f"{r['ttft_p50'] * 1e3:7.0f}ms {r['ttft_p99'] * 1e3:7.0f}ms {r['errors']:6d}"
                + (f"  ({r['first_error']})" if r["errors"] else ""), flush=True)
      finally:
        proc.terminate()
        proc.wait(timeout=60)
  print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  console.cli(main)
