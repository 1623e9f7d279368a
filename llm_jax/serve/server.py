"""Loading runs into engines and running the HTTP server (in the foreground, or in a thread).

  models = [load_model("runs/sft"), load_model("runs/pre:base")]
  with BackgroundServer(create_app(models)) as server:     # 127.0.0.1, a free port
    requests.get(server.url + "/health")

Both run uvicorn with `uvicorn_config`: connections bounded and timed (`connections.py`), idle ones
kept longer than clients' pools keep them.
"""

from __future__ import annotations

import os
import socket
import threading
import time

from absl import logging
import uvicorn

from llm_jax import rundir
from llm_jax.serve import connections as connections_lib
from llm_jax.serve.app import ServedModel
from llm_jax.serve.guard import Limits
from llm_jax.serve.metrics import Connections
from llm_jax.serve.scheduler import Engine


def parse_spec(spec: str) -> tuple[str, str]:
  """"runs/pre:base" -> ("runs/pre", "base"); "runs/sft" -> ("runs/sft", "sft")."""
  path, sep, name = spec.rpartition(":")
  if not sep or not name or "/" in name or os.sep in name:
    path, name = spec, ""
  path = path.rstrip("/" + os.sep) or path
  return path, name or os.path.basename(os.path.abspath(path))


def load_model(spec: str, *, n_slots: int = 16, max_context: int = 0, prefill_chunk: int = 256,
               min_bucket: int = 32, step: int = -1, max_waiting: int = 1024) -> ServedModel:
  workdir, name = parse_spec(spec)
  run = rundir.load(workdir, step)
  run.tokenizer.require_chat_tokens()
  context = min(run.context, max_context) if max_context else run.context
  engine = Engine(run.params, run.model_cfg, run.tokenizer, name=name, n_slots=n_slots, context=context,
                  prefill_chunk=prefill_chunk, min_bucket=min_bucket, max_waiting=max_waiting)
  logging.info("model %s: %s, context %d tokens, %d slots", name, workdir, context, n_slots)
  return ServedModel(name=name, engine=engine, context=context, workdir=workdir)


def free_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
  """A listening TCP socket (port 0: a free port chosen by the OS, no race with other servers)."""
  sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind((host, port))
  sock.listen(2048)
  sock.set_inheritable(True)
  return sock


def url_of(sock: socket.socket) -> str:
  host, port = sock.getsockname()[:2]
  return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def uvicorn_config(app, limits: Limits, connections: Connections, **kwargs) -> uvicorn.Config:
  """uvicorn's settings for `app`: bounded, timed connections (connections.py), keep-alive of
  `limits.keep_alive_s`, warnings only (a client that drops a connection is not news)."""
  kwargs.setdefault("log_level", "warning")
  kwargs.setdefault("timeout_graceful_shutdown", 3)
  return uvicorn.Config(app, http=connections_lib.protocol_class(limits, connections),
                        timeout_keep_alive=limits.keep_alive_s, **kwargs)


class BackgroundServer:
  """uvicorn serving `app` from a thread, on a socket bound before it starts. Starts the models'
  engines and stops everything on exit (`engines=False`: engines someone else runs are left alone).
  `app` may also be a startup.Startup; `limits`, `connections`: default the app's own."""

  def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, limits: Limits | None = None,
               connections: Connections | None = None, engines: bool = True):
    self.app = app
    self.engines = engines and hasattr(app, "state")
    state = getattr(app, "state", None)
    limits = limits or getattr(state, "limits", None) or Limits()
    connections = connections or getattr(state, "connections", None) or Connections()
    self.sock = free_socket(host, port)
    self.url = url_of(self.sock)
    self._server = uvicorn.Server(uvicorn_config(app, limits, connections, timeout_graceful_shutdown=2))
    self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self.sock]}, daemon=True)

  @property
  def open_connections(self) -> int:
    """Connections uvicorn holds now."""
    return len(self._server.server_state.connections)

  def start(self) -> "BackgroundServer":
    for m in self._models():
      m.engine.start()
    self._thread.start()
    deadline = time.time() + 60
    while not self._server.started:
      if time.time() > deadline or not self._thread.is_alive():
        raise RuntimeError("the server did not start")
      time.sleep(0.01)
    return self

  def stop(self) -> None:
    self._server.should_exit = True
    self._thread.join(timeout=30)
    for m in self._models():
      m.engine.stop()
    self.sock.close()

  def _models(self) -> list:
    return list(self.app.state.models.values()) if self.engines else []

  def __enter__(self) -> "BackgroundServer":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()
