"""The connections the server holds: bounded in number, each request given a deadline to arrive,
idle ones kept open longer than clients' connection pools keep them.

  config = uvicorn.Config(app, http=protocol_class(limits, counts), timeout_keep_alive=limits.keep_alive_s)

uvicorn alone holds a connection that never sends a request (or sends its head or body a byte at a
time) for as long as the client likes, and accepts as many as the file descriptors allow. Here:

  * the request head must arrive within `request_timeout_s` of the connection opening (or of its
    first byte, on a kept-alive connection), and its body within that again (the app answers 408
    first; this closes a connection whose body nobody reads);
  * at `max_connections`, a new connection closes the one that has waited longest for a request
    (a fresh or kept-alive connection doing nothing), and is refused (503, Retry-After) only when
    every connection has a request in progress;
  * uvicorn's keep-alive (`timeout_keep_alive`) is set above the 5 s after which httpx and the
    openai client drop an idle connection: a server closing at the same moment as the client
    reuses it is a race the client loses (a ReadError, or a silently re-sent POST).
"""

from __future__ import annotations

import itertools
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from llm_jax.serve.guard import Limits
from llm_jax.serve.metrics import Connections

_BODY_GRACE_S = 5.0  # past the app's own 408 deadline, for a body no route reads
_REFUSED_LINGER_S = 1.0  # a refused connection stays half-open this long, so its client reads the 503
# Order in which connections began to wait for a request (the loop's clock, uvloop's at least, ticks
# once per iteration: connections accepted together would tie).
_IDLE_ORDER = itertools.count()


def _refusal(limit: int) -> bytes:
  body = json.dumps({"error": {"message": f"the server holds its limit of {limit} connections, all of them with a "
                                          "request in progress; retry shortly", "type": "server_error",
                               "param": None, "code": "too_many_connections"}}).encode()
  head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
          "retry-after: 1\r\nconnection: close\r\n\r\n")
  return head.encode() + body


def protocol_class(limits: Limits, counts: Connections) -> type:
  """uvicorn's h11 protocol with the bounds above; `counts` receives open/refused/closed figures."""

  class Protocol(H11Protocol):

    def connection_made(self, transport) -> None:  # pylint: disable=arguments-renamed
      super().connection_made(transport)
      counts.open += 1
      self._deadline = None
      self._refused = False
      self._idle_since = next(_IDLE_ORDER)
      live = sum(1 for c in self.connections if not c.transport.is_closing() and not getattr(c, "_refused", False))
      if live > limits.max_connections and not self._close_longest_idle():
        self._refuse()
        return
      self._arm(limits.request_timeout_s)  # the first request's head

    def connection_lost(self, exc) -> None:
      counts.open -= 1
      self._disarm()
      super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
      if self._refused:
        return
      if self._deadline is None and self._between_requests():
        self._arm(limits.request_timeout_s)  # a request begins on a kept-alive connection
      super().data_received(data)

    def handle_events(self) -> None:
      before = self.cycle
      super().handle_events()
      if self.cycle is not before and not self.transport.is_closing():  # a request's head arrived
        if self.conn.their_state is h11.SEND_BODY:
          self._arm(limits.request_timeout_s + _BODY_GRACE_S)
        else:
          self._disarm()

    def handle_websocket_upgrade(self, event) -> None:
      self._disarm()  # the connection is the WebSocket protocol's from here on
      super().handle_websocket_upgrade(event)

    def on_response_complete(self) -> None:
      self._disarm()
      self._idle_since = next(_IDLE_ORDER)
      super().on_response_complete()

    # ---- ours ----

    def _between_requests(self) -> bool:
      return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def _arm(self, delay: float) -> None:
      self._disarm()
      self._deadline = self.loop.call_later(delay, self._expire)

    def _disarm(self) -> None:
      if self._deadline is not None:
        self._deadline.cancel()
        self._deadline = None

    def _expire(self) -> None:
      self._deadline = None
      if self.transport.is_closing():
        return
      if self._between_requests() or self.conn.their_state is h11.SEND_BODY:  # head or body too late
        counts.timed_out += 1
        self.transport.close()

    def _close_longest_idle(self) -> bool:
      idle = [c for c in self.connections if c is not self and isinstance(c, Protocol) and not c._refused
              and not c.transport.is_closing() and c._between_requests()]
      if not idle:
        return False
      oldest = min(idle, key=lambda c: c._idle_since)
      counts.closed_idle += 1
      oldest.transport.close()
      return True

    def _refuse(self) -> None:
      self._refused = True
      counts.refused += 1
      self.transport.write(_refusal(limits.max_connections))
      if self.transport.can_write_eof():
        self.transport.write_eof()  # the client reads the 503 before the connection goes
        self.loop.call_later(_REFUSED_LINGER_S, self.transport.close)
      else:
        self.transport.close()

  return Protocol
