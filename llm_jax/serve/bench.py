"""Load benchmark of the server: concurrent streaming chat clients against random-weight runs.

  python -m llm_jax.serve.bench
  python -m llm_jax.serve.bench --models=tiny --clients=1,8 --requests_per_client=2
  python -m llm_jax.serve.bench --models=tiny --clients=100 --mixed=1000   # then a mixed load with drops

For each model shape it writes a run directory (random weights, a SentencePiece tokenizer trained
on the embedded encyclopedia), starts `python -m llm_jax.serve` on it as a separate process (on a
free 127.0.0.1 port, every shape compiled first), and runs 1, 8, 32 and 100 concurrent clients.
Each client sends `requests_per_client` streaming chat requests one after the other (questions of
the encyclopedia, `max_tokens` tokens each: `ignore_eos`, as random weights would stop anywhere)
and records the time to its first content chunk. Printed, never asserted: requests/s, output
tokens/s, p50/p99 time to first token, and errors. The load generator shares the machine with
the server, as it would on a laptop.

`--mixed=N` then sends N requests of every kind from `--mixed_clients` clients, each with its own
connection pool (httpx's 5 s keep-alive expiry, as the openai client's): streamed and whole chats,
completions with n=2, echoed log-probs (lm-eval's requests), /tokenize, /health, invalid requests
(a 400 is their right answer), streams the client drops after the first token (`--drop_fraction`),
and requests sent after an idle pause just under 5 s (`--pause_fraction`: the client still trusts
its connection, and a server that closes idle connections at 5 s may close it under the request). Errors are
transport errors and unexpected statuses, by kind; the server's resident memory is read from
/proc after warm-up, after the levels and after the mixed load.
"""

import asyncio
import collections
import json
import os
import platform
import random
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
_MIXED = flags.DEFINE_integer("mixed", 0, "Mixed requests sent after the levels (0: none).")
_MIXED_CLIENTS = flags.DEFINE_integer("mixed_clients", 32, "Concurrent clients of the mixed load.")
_DROP = flags.DEFINE_float("drop_fraction", 0.1, "Mixed: streams dropped by the client after the first token.")
_PAUSE = flags.DEFINE_float("pause_fraction", 0.05, "Mixed: requests sent after an idle pause of 4.97-5 s.")
_SEED = flags.DEFINE_integer("seed", 0, "Mixed: the request mix's random seed.")
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


def start_server(workdir: str) -> tuple[subprocess.Popen, str, float | None]:
  """(the server process, its URL, seconds until it listened: None if it only says when ready)."""
  t0 = time.perf_counter()
  listening = None
  proc = subprocess.Popen([sys.executable, "-m", "llm_jax.serve", f"--workdir={workdir}:bench", "--port=0",
                           f"--slots={_SLOTS.value}", f"--db={os.path.join(workdir, 'arena.sqlite')}"],
                          stdout=subprocess.PIPE, text=True)
  for line in proc.stdout:
    if line.startswith("Listening on ") and listening is None:
      listening = time.perf_counter() - t0
    if "page: " in line:
      return proc, line.split("page: ")[1].strip().rstrip("/"), listening
  raise RuntimeError(f"the server exited with {proc.wait()}")


def rss_mib(pid: int) -> float:
  """Resident memory of a process (Linux /proc), in MiB; nan elsewhere."""
  try:
    with open(f"/proc/{pid}/status") as f:
      return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
  except (OSError, StopIteration):
    return float("nan")


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


def _pct(values, q) -> float:
  return float(np.percentile(np.array(values), q)) if values else float("nan")


async def mixed_request(http, url: str, kind: str, question: str) -> dict:
  """One request of the mixed load: {"kind", "status" or "error", "ttft", "tokens"}."""
  chat = {"model": "bench", "messages": [{"role": "user", "content": question}], "temperature": 0.8,
          "ignore_eos": True}
  out = {"kind": kind, "ttft": None, "tokens": 0}
  start = time.perf_counter()
  try:
    if kind in ("stream", "drop"):
      body = {**chat, "max_tokens": _MAX_TOKENS.value, "stream": True, "stream_options": {"include_usage": True}}
      async with http.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        out["status"] = resp.status_code
        if resp.status_code != 200:
          await resp.aread()
          return out
        async for line in resp.aiter_lines():
          if not line.startswith("data: {"):
            continue
          chunk = json.loads(line[6:])
          if chunk.get("usage"):
            out["tokens"] = chunk["usage"]["completion_tokens"]
          if out["ttft"] is None and any(c["delta"].get("content") for c in chunk.get("choices", [])):
            out["ttft"] = time.perf_counter() - start
            if kind == "drop":
              return out  # leaving the block closes the connection mid-stream
      return out
    if kind == "chat":
      resp = await http.post(url + "/v1/chat/completions", json={**chat, "max_tokens": _MAX_TOKENS.value // 2})
    elif kind == "n2":
      resp = await http.post(url + "/v1/completions", json={"model": "bench", "prompt": question, "n": 2,
                                                             "max_tokens": 16, "ignore_eos": True})
    elif kind == "echo":  # lm-eval's loglikelihood request
      resp = await http.post(url + "/v1/completions", json={"model": "bench", "prompt": question + " Paris.",
                                                            "echo": True, "logprobs": 5, "max_tokens": 0})
    elif kind == "tokenize":
      resp = await http.post(url + "/tokenize", json={"model": "bench", "prompt": question, "return_token_strs": True})
    elif kind == "health":
      resp = await http.get(url + "/health")
    else:  # "invalid": a 400 is the right answer
      resp = await http.post(url + "/v1/chat/completions", json={**chat, "temperature": -1})
    out["status"] = resp.status_code
    if resp.status_code == 200 and kind in ("chat", "n2"):
      out["tokens"] = resp.json()["usage"]["completion_tokens"]
  except Exception as e:  # pylint: disable=broad-except
    out["error"] = type(e).__name__
  return out


MIX = {"stream": 0.3, "chat": 0.2, "n2": 0.1, "echo": 0.1, "tokenize": 0.1, "health": 0.05, "invalid": 0.05}


async def mixed_load(url: str, total: int, clients: int, qs: list[str]) -> dict:
  import httpx2 as httpx  # pylint: disable=g-import-not-at-top
  rng = random.Random(_SEED.value)
  kinds = list(MIX) + ["drop"]
  weights = [w * (1 - _DROP.value) for w in MIX.values()] + [_DROP.value]
  todo = [(rng.choices(kinds, weights)[0], qs[i % len(qs)], rng.random() < _PAUSE.value, rng.uniform(4.97, 5.0))
          for i in range(total)]
  todo.reverse()
  results = []

  async def client():
    # Its own pool with httpx's defaults: keep-alive expiry 5 s, as the openai client's.
    async with httpx.AsyncClient(timeout=600) as http:
      while todo:
        kind, question, pause, seconds = todo.pop()
        if pause:
          await asyncio.sleep(seconds)
        results.append(await mixed_request(http, url, kind, question))

  start = time.perf_counter()
  await asyncio.gather(*(client() for _ in range(clients)))
  elapsed = time.perf_counter() - start
  expected = lambda r: r.get("status") == (400 if r["kind"] == "invalid" else 200)
  errors = collections.Counter(r.get("error") or f"HTTP {r.get('status')} ({r['kind']})"
                               for r in results if "error" in r or not expected(r))
  ttft = [r["ttft"] for r in results if r["kind"] == "stream" and r["ttft"] is not None]
  return {"requests": len(results), "elapsed": elapsed, "errors": sum(errors.values()), "by_error": dict(errors),
          "kinds": dict(collections.Counter(r["kind"] for r in results)),
          "tok_per_s": sum(r["tokens"] for r in results) / elapsed, "ttft_p50": _pct(ttft, 50),
          "ttft_p99": _pct(ttft, 99)}


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
      proc, url, listening = start_server(workdir)
      print(f"\n{preset}: server ready in {time.perf_counter() - t0:.0f} s (load + compile)"
            + (f", listening after {listening:.1f} s" if listening is not None else "")
            + f"; server RSS {rss_mib(proc.pid):.0f} MiB")
      print(f"  {'clients':>7} {'requests':>8} {'req/s':>7} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
            f"{'errors':>6}")
      try:
        for clients in (int(c) for c in _CLIENTS.value):
          r = asyncio.run(load_level(url, clients, _REQUESTS.value, qs, _MAX_TOKENS.value))
          print(f"  {r['clients']:7d} {r['requests']:8d} {r['req_per_s']:7.2f} {r['tok_per_s']:9.1f} "
                f"{r['ttft_p50'] * 1e3:7.0f}ms {r['ttft_p99'] * 1e3:7.0f}ms {r['errors']:6d}"
                + (f"  ({r['first_error']})" if r["errors"] else ""), flush=True)
        print(f"  server RSS after the levels: {rss_mib(proc.pid):.0f} MiB", flush=True)
        if _MIXED.value:
          m = asyncio.run(mixed_load(url, _MIXED.value, _MIXED_CLIENTS.value, qs))
          print(f"  mixed: {m['requests']} requests from {_MIXED_CLIENTS.value} clients in {m['elapsed']:.0f} s "
                f"({', '.join(f'{k} {v}' for k, v in sorted(m['kinds'].items()))})\n"
                f"    out tok/s {m['tok_per_s']:.1f}, TTFT p50 {m['ttft_p50'] * 1e3:.0f}ms p99 "
                f"{m['ttft_p99'] * 1e3:.0f}ms (streams kept to the end), errors {m['errors']}"
                + (f" {m['by_error']}" if m["errors"] else "")
                + f"\n  server RSS after the mixed load: {rss_mib(proc.pid):.0f} MiB", flush=True)
      finally:
        proc.terminate()
        proc.wait(timeout=60)
  print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  console.cli(main)
