"""Serve one or more runs over an OpenAI-compatible API, with a chat and arena page.

  python -m llm_jax.serve --workdir=runs/sft
  python -m llm_jax.serve --workdir=runs/sft --workdir=runs/pre:base --port=8000 --api_key=secret

`:name` sets a run's model id (default: the directory's name). The server listens at once; while
the runs load and compile, /health answers 503 with the progress (also printed) and the API 503
with Retry-After. The page is at the printed URL; the API at <url>/v1 (point the `openai` client's
base_url there).
"""

import os
import threading


from absl import flags

from llm_jax import console

_WORKDIR = flags.DEFINE_multi_string("workdir", None, "Run directory to serve, optionally with :name "
                                     "(the model id; default the directory's name). Repeat for several.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind (0.0.0.0 exposes the server to the network).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on (0 picks a free one).")
_API_KEY = flags.DEFINE_string("api_key", os.environ.get("LLM_JAX_API_KEY", ""),
                               "If set, API requests and /metrics need 'Authorization: Bearer <key>' (default: "
                               "$LLM_JAX_API_KEY).")
_ALLOWED_HOSTS = flags.DEFINE_list("allowed_hosts", [], "Without --api_key, Host names answered besides the bound "
                                   "address (and localhost for a loopback one); '*' answers any.")
_DB = flags.DEFINE_string("db", "arena.sqlite", "SQLite file of the arena's votes.")
_SLOTS = flags.DEFINE_integer("slots", 16, "Requests decoded together per model (rows of the KV cache).")
_MAX_CONTEXT = flags.DEFINE_integer("max_context", 0, "Cap on prompt + max_tokens; 0 = the run's own "
                                    "limit (the seq_len it was trained on).")
_CHUNK = flags.DEFINE_integer("prefill_chunk", 256, "Longest prompt piece written per step (longer prompts "
                              "are prefilled in chunks between decode steps).")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step to load (every run); -1 is the latest.")
_WARMUP = flags.DEFINE_bool("warmup", True, "Compile every program a request can reach before the API answers "
                            "(the server listens meanwhile: /health shows the progress).")
_MAX_BODY_MB = flags.DEFINE_float("max_body_mb", 8.0, "Largest request body accepted (413 beyond).")
_MAX_PROMPT_BYTES = flags.DEFINE_integer("max_prompt_bytes", 0, "Largest prompt text (bytes, checked before "
                                         "tokenizing; 400 beyond); 0 = 32 bytes per token of context, at least "
                                         "64 KiB.")
_MAX_CHOICES = flags.DEFINE_integer("max_choices", 64, "Most choices (prompts x n) one request may ask for.")
_MAX_WAITING = flags.DEFINE_integer("max_waiting", 1024, "Choices that may wait for a slot, per model (429 "
                                    "beyond); one client may hold a quarter of them.")
_REQUEST_TIMEOUT = flags.DEFINE_float("request_timeout_s", 30.0, "A request's head, then its body, must arrive "
                                      "within this (408, and the connection is closed).")
_KEEP_ALIVE = flags.DEFINE_float("keep_alive_s", 75.0, "Idle connections stay open this long (longer than "
                                 "clients' pools keep them: 5 s for httpx and openai).")
_MAX_CONNECTIONS = flags.DEFINE_integer("max_connections", 1024, "Open connections; beyond, the longest idle "
                                        "one is closed, or the new one refused (503) if none is idle.")
_VOTES = flags.DEFINE_integer("votes_per_minute", 30, "Arena votes each client may cast per minute.")
flags.mark_flags_as_required(["workdir"])


def _file_limit(wanted: int) -> int:
  """Raises the open-file limit towards `wanted` descriptors; returns what it allows."""
  try:
    import resource  # pylint: disable=g-import-not-at-top
  except ImportError:  # not on this platform
    return wanted
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  if soft != resource.RLIM_INFINITY and soft < wanted:
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
      resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
      soft = target
    except (ValueError, OSError):
      pass
  return wanted if soft == resource.RLIM_INFINITY else soft


def main():
  import uvicorn  # pylint: disable=g-import-not-at-top

  from llm_jax.serve import guard, server  # pylint: disable=g-import-not-at-top
  from llm_jax.serve.app import create_app  # pylint: disable=g-import-not-at-top
  from llm_jax.serve.metrics import Connections  # pylint: disable=g-import-not-at-top
  from llm_jax.serve.startup import Cancelled, Startup  # pylint: disable=g-import-not-at-top

  specs = [server.parse_spec(s) for s in _WORKDIR.value]
  names = [n for _, n in specs]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(f"two runs are served as {dup[0]!r}; give them names: --workdir=PATH:NAME")
  for path, _ in specs:
    if not os.path.isdir(path):
      raise ValueError(f"--workdir={path}: no such directory")
  if _SLOTS.value < 1 or _CHUNK.value < 16 or _MAX_CONTEXT.value < 0:
    raise ValueError("--slots must be >= 1, --prefill_chunk >= 16 and --max_context >= 0")
  if min(_MAX_CHOICES.value, _MAX_WAITING.value, _MAX_CONNECTIONS.value, _VOTES.value) < 1 or \
      min(_REQUEST_TIMEOUT.value, _KEEP_ALIVE.value) <= 0 or _MAX_PROMPT_BYTES.value < 0:
    raise ValueError("--max_choices, --max_waiting, --max_connections, --votes_per_minute, --request_timeout_s and "
                     "--keep_alive_s must be positive, --max_prompt_bytes >= 0")
  max_connections = _MAX_CONNECTIONS.value
  allowed = _file_limit(max_connections + 128) - 128  # files, sockets and the engines' own descriptors
  if allowed < max_connections:
    max_connections = max(allowed, 16)
    print(f"--max_connections lowered to {max_connections}: the open-file limit (ulimit -n) allows no more",
          flush=True)
  limits = guard.Limits(max_body_bytes=int(_MAX_BODY_MB.value * (1 << 20)), max_prompt_bytes=_MAX_PROMPT_BYTES.value,
                        max_choices=_MAX_CHOICES.value, request_timeout_s=_REQUEST_TIMEOUT.value,
                        keep_alive_s=_KEEP_ALIVE.value, max_connections=max_connections,
                        votes_per_minute=_VOTES.value)
  sock = server.free_socket(_HOST.value, _PORT.value)
  url = server.url_of(sock)
  hosts = guard.host_allow_list(_HOST.value, _ALLOWED_HOSTS.value)
  connections, http_counts = Connections(), {}
  key = _API_KEY.value or None

  def load():
    return [server.load_model(s, n_slots=_SLOTS.value, max_context=_MAX_CONTEXT.value, prefill_chunk=_CHUNK.value,
                              step=_STEP.value, max_waiting=_MAX_WAITING.value) for s in _WORKDIR.value]

  def make_app(models):
    return create_app(models, api_key=key, db_path=_DB.value, limits=limits, hosts=hosts, readiness=startup,
                      connections=connections, http_counts=http_counts)

  say = lambda line: print(line, flush=True)
  startup = Startup(names, load=load, make_app=make_app, warmup=_WARMUP.value, say=say, http_counts=http_counts)
  uv = uvicorn.Server(server.uvicorn_config(startup, limits, connections))

  def start():
    try:
      startup.run()
    except BaseException:  # pylint: disable=broad-except
      uv.should_exit = True  # main() raises it once uvicorn has stopped (unless it was a stop)
      return
    print(f"Serving {', '.join(names)}\n  page: {url}/\n  API:  {url}/v1  (OpenAI-compatible"
          f"{'; Bearer key required' if key else ''})\n  arena votes: {os.path.abspath(_DB.value)}", flush=True)

  say(f"Listening on {url} (starting: /health answers 503 with the progress until the models are ready)")
  starting = threading.Thread(target=start, name="startup", daemon=True)
  starting.start()
  try:
    uv.run(sockets=[sock])
  except KeyboardInterrupt:  # uvicorn shuts down on Ctrl-C, then re-raises it: a stop, not an error
    print("Stopped.", flush=True)
  finally:
    startup.cancel()  # a stop during the warm-up: no further program is compiled
    starting.join(timeout=60)
    for m in startup.models:
      m.engine.stop()
  if startup.error is not None and not isinstance(startup.error, Cancelled):
    raise startup.error


if __name__ == "__main__":
  console.cli(main)
