"""Start-up: the server listens at once and answers while its runs load and compile.

  startup = Startup(["sft"], load=lambda: [server.load_model("runs/sft")],
                    make_app=lambda models: create_app(models, readiness=startup), say=print)
  # uvicorn serves `startup` (an ASGI app) from the first second; in a thread:
  startup.run()   # loads the runs, builds the app, compiles every program (saying so), starts the engines

Until the app exists (the runs are loading) `startup` answers every request itself: /health with
503 {"status": "loading", ...} and everything else with 503 in the API's error shape, both with
Retry-After. Then the app answers: /health with 503 {"status": "warming_up", "programs": {"compiled",
"total"}} and the API with 503 until every program is compiled, the page and /metrics at once.
Compiling is the slow part (minutes for a large model on a loaded machine); each program compiled
is a line on the console.
"""

from __future__ import annotations

import json
import time
from typing import Callable


class Cancelled(Exception):
  """The start-up was cancelled (the server stopped while it loaded or compiled)."""


class Startup:
  """The ASGI app uvicorn serves from the first second, and the readiness the app consults."""

  def __init__(self, names: list[str], *, load: Callable[[], list], make_app: Callable[[list], object],
               warmup: bool = True, say: Callable[[str], None] = print, http_counts: dict | None = None):
    self.names, self.load, self.make_app, self.warmup, self.say = list(names), load, make_app, warmup, say
    self.http_counts = http_counts if http_counts is not None else {}
    self.app = None
    self.models: list = []
    self.phase = "loading"  # -> "warming_up" -> "ready", or "failed"
    self.detail = f"loading {len(self.names)} run(s)"
    self.compiled = self.total = 0
    self.error: BaseException | None = None
    self._cancelled = False
    self._t0 = time.time()
    self._t_warm: float | None = None

  # ---- readiness (what the app asks) ----

  @property
  def ready(self) -> bool:
    return self.phase == "ready"

  def health(self) -> dict:
    out = {"status": self.phase, "models": self.names, "detail": self.detail,
           "elapsed_s": round(time.time() - self._t0, 1)}
    if self.phase == "warming_up":
      out["programs"] = {"compiled": self.compiled, "total": self.total}
    return out

  def retry_after(self) -> int:
    """Seconds until the server is likely ready (the compile time so far, extrapolated)."""
    if self.phase == "warming_up" and self.compiled and self._t_warm is not None:
      per = (time.time() - self._t_warm) / self.compiled
      return int(min(60, max(1, per * (self.total - self.compiled))))
    return 5

  # ---- the start-up itself (a thread) ----

  def run(self) -> None:
    """Loads, builds the app, compiles, starts the engines. An error is kept in `error` (the phase
    becomes "failed") and raised again."""
    try:
      t = time.time()
      self.models = self.load()
      self.app = self.make_app(self.models)
      self.say(f"  loaded {', '.join(self.names)} in {time.time() - t:.1f} s")
      self.phase, self._t_warm = "warming_up", time.time()
      if self.warmup:
        self._compile()
      if self._cancelled:
        raise Cancelled()
      for m in self.models:
        m.engine.start()
      self.detail = "ready"
      self.phase = "ready"
    except BaseException as e:  # pylint: disable=broad-except
      self.error, self.phase, self.detail = e, "failed", f"start-up failed: {type(e).__name__}: {e}"
      raise

  def _compile(self) -> None:
    plans = [(m, m.engine.programs()) for m in self.models]
    self.total = sum(len(p) for _, p in plans)
    self.detail = f"compiling {self.total} programs"
    self.say(f"  compiling {self.total} programs (every prefill and decode shape, once, so that no request waits "
             "on the compiler); the API answers 503 until they are done")
    for m, _ in plans:
      start = time.time()

      def progress(done, total, program, m=m, start=start):
        if self._cancelled:
          raise Cancelled()
        self.compiled += 1
        self.detail = f"compiling programs: {self.compiled} of {self.total} done"
        what = (f"prefill {program[1]} tokens{' with log-probs' if program[2] else ''}" if program[0] == "prefill"
                else f"decode {program[1]} rows, window {program[2]}")
        self.say(f"  {m.name}: compiled {done}/{total} ({what}), {time.time() - start:.1f} s")

      seconds = m.engine.warmup(progress=progress)
      self.say(f"  {m.name}: {len(m.engine.programs())} programs compiled in {seconds:.1f} s")

  def cancel(self) -> None:
    """Stops the start-up after the program being compiled (the server is shutting down)."""
    self._cancelled = True

  def close(self) -> None:
    if self.app is not None:
      self.app.state.close()

  # ---- the ASGI app ----

  async def __call__(self, scope, receive, send):
    if scope["type"] == "lifespan":  # uvicorn's, once: the real app's lifespan never runs (see close)
      while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
          await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
          self.close()
          await send({"type": "lifespan.shutdown.complete"})
          return
    app = self.app
    if app is not None:
      return await app(scope, receive, send)
    if scope["type"] != "http":
      return None
    path = scope.get("path", "")
    if path == "/health":
      body = self.health()
    else:
      body = {"error": {"message": f"the server is starting ({self.detail}); retry shortly", "type": "server_error",
                        "param": None, "code": "warming_up"}}
    key = (path if path == "/health" else "other", 503)
    self.http_counts[key] = self.http_counts.get(key, 0) + 1
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"retry-after", str(self.retry_after()).encode())]})
    await send({"type": "http.response.body", "body": data})
