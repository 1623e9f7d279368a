"""What /metrics reports: Prometheus text of each engine's figures, the HTTP responses counted by
path and status, and the connections; and the middleware that counts responses (and answers a
server error itself, so that it is counted too).

  counts, conns = {}, Connections()
  app.add_middleware(CountStatus, counts=counts, routes=paths_counted_by_name)
  PlainTextResponse(prometheus({name: engine.snapshot()}, counts, conns))
"""

from __future__ import annotations

import dataclasses
import json

from absl import logging


@dataclasses.dataclass
class Connections:
  """Connection figures, kept by `connections.protocol_class`."""
  open: int = 0
  refused: int = 0  # at max_connections with every connection busy: 503 and closed
  closed_idle: int = 0  # idle connections closed to make room for a new one
  timed_out: int = 0  # a request head or body that did not arrive in time


CLIENT_GONE = 499  # counted for requests whose client went away before the answer (nginx's code)


class CountStatus:
  """Pure ASGI middleware counting responses by path and status (a BaseHTTPMiddleware would sit
  between streaming responses and the client's disconnect). It is also where an unhandled error
  ends: answered as a 500 in the API's error shape and counted (Starlette's own handler sits
  outside every middleware, so its 500s were never counted), with the traceback logged once."""

  def __init__(self, app, counts: dict, routes: set):
    self.app, self.counts, self.routes = app, counts, routes

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    path = scope.get("path", "")
    started = False

    async def send_counted(message):
      nonlocal started
      if message["type"] == "http.response.start":
        started = True
        key = (path if path in self.routes else "other", message["status"])
        self.counts[key] = self.counts.get(key, 0) + 1
      await send(message)

    try:
      await self.app(scope, receive, send_counted)
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("internal error answering %s %s", scope.get("method"), path)
      if started:
        return  # a response broke off midway: uvicorn closes the connection
      body = json.dumps({"error": {"message": f"internal server error: {type(e).__name__}", "type": "server_error",
                                   "param": None, "code": None}}).encode()
      await send_counted({"type": "http.response.start", "status": 500,
                          "headers": [(b"content-type", b"application/json"),
                                      (b"content-length", str(len(body)).encode())]})
      await send_counted({"type": "http.response.body", "body": body})


def prometheus(snap: dict, http_counts: dict, connections: Connections | None = None) -> str:
  """The Prometheus text of the engines' snapshots ({model: Engine.snapshot()}), the HTTP
  responses counted by `CountStatus` ({(path, status): count}) and the connection figures."""
  lines = []

  def metric(name, kind, help_, values):
    lines.append(f"# HELP llm_jax_{name} {help_}")
    lines.append(f"# TYPE llm_jax_{name} {kind}")
    for labels, v in values:
      label = ",".join(f'{k}="{val}"' for k, val in labels.items())
      lines.append(f"llm_jax_{name}{{{label}}} {0 if v is None else v}" if label else
                   f"llm_jax_{name} {0 if v is None else v}")

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
  metric("http_responses_total", "counter", "HTTP responses by path and status (499: the client went away "
         "first; 5xx: the server's own errors).",
         [({"path": p, "status": st}, c) for (p, st), c in sorted(http_counts.items())])
  if connections is not None:
    metric("connections_open", "gauge", "Open HTTP connections.", [({}, connections.open)])
    for name, help_ in (("refused", "Connections refused (503) at --max_connections, every one busy."),
                        ("closed_idle", "Idle connections closed to make room for new ones."),
                        ("timed_out", "Connections closed because a request head or body did not arrive in "
                                      "--request_timeout_s.")):
      metric(f"connections_{name}_total", "counter", help_, [({}, getattr(connections, name))])
  return "\n".join(lines) + "\n"
