"""OpenAI-compatible serving of llm_jax runs (layer L4: imports the foundations, model/, data/,
rundir.py and infer/; never train/).

  __main__.py   `python -m llm_jax.serve`: listen at once, load runs, compile, start engines
  startup.py    the app served while runs load and compile (503 + progress), and the warm-up
  server.py     runs -> engines (ServedModel), the uvicorn server in the foreground or a thread
  connections.py  uvicorn's connections bounded in number, each request timed, long keep-alive
  app.py        the HTTP layer: routes that authenticate, parse (off the event loop) and hand work
                to the engines
  guard.py      request limits, the vote rate limit, Host/Origin/Content-Type checks without a key
  protocol.py   OpenAI request fields, validated with errors that name the field
  responses.py  OpenAI response shapes, SSE chunks, the engine-thread -> asyncio bridge
  metrics.py    Prometheus text and the status-counting middleware (where server errors end)
  scheduler.py  continuous batching: one engine thread per model; slots.py its KV-cache rows
  tokens.py     text <-> tokens for raw prompts and token strings
  arena.py      the blind two-model arena: battles, votes, a Bradley-Terry leaderboard
  static/       the chat and arena page
  bench.py      `python -m llm_jax.serve.bench`: load test
"""
