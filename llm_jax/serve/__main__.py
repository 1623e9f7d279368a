"""Serve one or more runs over an OpenAI-compatible API, with a chat and arena page.

  python -m llm_jax.serve --workdir=runs/sft
  python -m llm_jax.serve --workdir=runs/sft --workdir=runs/pre:base --port=8000 --api_key=secret

`:name` sets a run's model id (default: the directory's name). The page is at the printed URL;
the API at <url>/v1 (point the `openai` client's base_url there).
"""

import os


from absl import flags, logging

from llm_jax import console

_WORKDIR = flags.DEFINE_multi_string("workdir", None, "Run directory to serve, optionally with :name "
                                     "(the model id; default the directory's name). Repeat for several.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind (0.0.0.0 exposes the server to the network).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on (0 picks a free one).")
_API_KEY = flags.DEFINE_string("api_key", os.environ.get("LLM_JAX_API_KEY", ""),
                               "If set, API requests need 'Authorization: Bearer <key>' (default: "
                               "$LLM_JAX_API_KEY).")
_DB = flags.DEFINE_string("db", "arena.sqlite", "SQLite file of the arena's votes.")
_SLOTS = flags.DEFINE_integer("slots", 16, "Requests decoded together per model (rows of the KV cache).")
_MAX_CONTEXT = flags.DEFINE_integer("max_context", 0, "Cap on prompt + max_tokens; 0 = the run's own "
                                    "limit (the seq_len it was trained on).")
_CHUNK = flags.DEFINE_integer("prefill_chunk", 256, "Longest prompt piece written per step (longer prompts "
                              "are prefilled in chunks between decode steps).")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step to load (every run); -1 is the latest.")
_WARMUP = flags.DEFINE_bool("warmup", True, "Compile every prefill/decode shape before serving.")
_MAX_BODY_MB = flags.DEFINE_float("max_body_mb", 8.0, "Largest request body accepted (413 beyond).")
flags.mark_flags_as_required(["workdir"])


def main():
  import uvicorn  # pylint: disable=g-import-not-at-top

  from llm_jax.serve import server  # pylint: disable=g-import-not-at-top
  from llm_jax.serve.app import create_app  # pylint: disable=g-import-not-at-top

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
  models = [server.load_model(s, n_slots=_SLOTS.value, max_context=_MAX_CONTEXT.value,
                              prefill_chunk=_CHUNK.value, step=_STEP.value) for s in _WORKDIR.value]
  if _WARMUP.value:
    for m in models:
      seconds = m.engine.warmup()
      logging.info("model %s: compiled %d prefill/decode shapes in %.1fs", m.name,
                   m.engine.snapshot()["programs"], seconds)
  sock = server.free_socket(_HOST.value, _PORT.value)
  url = server.url_of(sock)
  application = create_app(models, api_key=_API_KEY.value or None, db_path=_DB.value,
                           max_body_bytes=int(_MAX_BODY_MB.value * (1 << 20)))
  for m in models:
    m.engine.start()
  print(f"Serving {', '.join(names)}\n  page: {url}/\n  API:  {url}/v1  (OpenAI-compatible"
        f"{'; Bearer key required' if _API_KEY.value else ''})\n  arena votes: {os.path.abspath(_DB.value)}",
        flush=True)
  try:
    uvicorn.Server(uvicorn.Config(application, log_level="warning", timeout_graceful_shutdown=3)).run(
        sockets=[sock])
  except KeyboardInterrupt:  # uvicorn shuts down on Ctrl-C, then re-raises it: a stop, not an error
    print("Stopped.", flush=True)
  finally:
    for m in models:
      m.engine.stop()


if __name__ == "__main__":
  console.cli(main)
