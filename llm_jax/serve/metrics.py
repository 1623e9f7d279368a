"""What /metrics reports: Prometheus text of each engine's figures, and the middleware that counts
HTTP responses by path and status.

  counts = {}
  app.add_middleware(CountStatus, counts=counts, routes=paths_counted_by_name)
  PlainTextResponse(prometheus({name: engine.snapshot()}, counts))
"""

from __future__ import annotations


class CountStatus:
  """Pure ASGI middleware counting responses by path and status (a BaseHTTPMiddleware would sit
  between streaming responses and the client's disconnect)."""

  def __init__(self, app, counts: dict, routes: set):
    self.app, self.counts, self.routes = app, counts, routes

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    path = scope.get("path", "")

    async def send_counted(message):
      if message["type"] == "http.response.start":
        key = (path if path in self.routes else "other", message["status"])
        self.counts[key] = self.counts.get(key, 0) + 1
      await send(message)

    return await self.app(scope, receive, send_counted)


def prometheus(snap: dict, http_counts: dict) -> str:
  """The Prometheus text of the engines' snapshots ({model: Engine.snapshot()}) and the HTTP
  responses counted by `CountStatus` ({(path, status): count})."""
  lines = []

  def metric(name, kind, help_, values):
    lines.append(f"# HELP llm_jax_{name} {help_}")
    lines.append(f"# TYPE llm_jax_{name} {kind}")
    for labels, v in values:
      label = ",".join(f'{k}="{val}"' for k, val in labels.items())
      lines.append(f"llm_jax_{name}{{{label}}} {0 if v is None else v}")

  per = lambda key: [({"model": m}, s[key]) for m, s in snap.items()]
  metric("requests_total", "counter", "Sequences admitted into a slot (one per choice).", per("requests"))
  metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", per("prompt_tokens"))
  metric("generation_tokens_total", "counter", "Tokens generated.", per("generated_tokens"))
  metric("generation_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
         per("tokens_per_s"))
  metric("requests_waiting", "gauge", "Sequences queued for a free slot.", per("waiting"))
  metric("slots_used", "gauge", "Slots of the batched KV cache in use.", per("slots_used"))
  metric("slots_total", "gauge", "Slots of the batched KV cache.", per("slots"))
  metric("compiled_programs", "gauge", "Distinct prefill/decode shapes compiled.", per("programs"))
  metric("engine_errors_total", "counter", "Decode loop failures (requests in flight got an error).",
         per("errors"))
  metric("time_to_first_token_seconds", "summary", "Time to first token of recent requests.",
         [({"model": m, "quantile": q}, s[k]) for m, s in snap.items()
          for q, k in (("0.5", "ttft_p50_s"), ("0.99", "ttft_p99_s"))])
  metric("http_responses_total", "counter", "HTTP responses by path and status.",
         [({"path": p, "status": st}, c) for (p, st), c in sorted(http_counts.items())])
  return "\n".join(lines) + "\n"
