"""What one client may ask of the server, and who may ask at all.

  limits = Limits(max_choices=64, request_timeout_s=30)   # the bounds of one request and connection
  hosts = host_allow_list("127.0.0.1", extra=["myhost.lan"])
  app.add_middleware(BrowserGuard, hosts=hosts)            # only when the server has no API key
  votes = RateLimiter(per_minute=30); wait = votes.take(client)   # 0.0, or seconds until allowed

Without an API key anything that can reach the port can use the API, and that includes web pages
the user visits: a page may POST to http://127.0.0.1:8000 (a "simple" cross-origin request needs no
permission), and a DNS-rebinding page (evil.example resolving to 127.0.0.1) may even read the
answers. `BrowserGuard` closes both: a request whose Host names anything but the bound address (or
--allowed_hosts) is refused, as is one that a browser marks as coming from another origin, and JSON
routes take only `Content-Type: application/json` (which a cross-origin page cannot send without
the server's permission, never given). With a key none of this is needed: a page does not have it.
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import json
import socket
import threading
import time


@dataclasses.dataclass(frozen=True)
class Limits:
  """The bounds of one request and of the connections (the server's flags set them)."""
  max_body_bytes: int = 8 << 20  # a request body (413 beyond)
  max_prompt_bytes: int = 0  # text of one prompt, before tokenizing; 0: per model, see prompt_bytes()
  max_choices: int = 64  # prompts x n of one request
  request_timeout_s: float = 30.0  # a request's head, then its body, must arrive within this (408)
  keep_alive_s: float = 75.0  # idle connections stay open this long (clients' pools expire at 5-60 s)
  max_connections: int = 1024  # open connections; beyond, idle ones are closed, else new ones refused
  votes_per_minute: int = 30  # arena votes per client

  def prompt_bytes(self, context: int) -> int:
    """The byte bound for a model of `context` tokens: far above what its context holds (32 bytes
    a token; real text has 3 to 5), so it only stops prompts that could never fit."""
    return self.max_prompt_bytes or max(64 << 10, 32 * context)


class RateLimiter:
  """A token bucket per key: `per_minute` actions a minute, all of them at once if saved up."""

  def __init__(self, per_minute: int, max_keys: int = 10_000):
    self.rate, self.burst = per_minute / 60.0, float(per_minute)
    self.max_keys = max_keys
    self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()
    self._lock = threading.Lock()

  def take(self, key: str) -> float:
    """Takes one action for `key`: 0.0 if allowed, else the seconds until it would be."""
    now = time.monotonic()
    with self._lock:
      tokens, last = self._buckets.pop(key, (self.burst, now))
      tokens = min(self.burst, tokens + (now - last) * self.rate)
      wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate if self.rate else float("inf")
      self._buckets[key] = (tokens - 1 if not wait else tokens, now)
      while len(self._buckets) > self.max_keys:
        self._buckets.popitem(last=False)
    return wait


# ---- Host, Origin and Content-Type when the server has no key --------------------------------------

@dataclasses.dataclass(frozen=True)
class HostAllowList:
  """Host header names (lowercase, no port) the server answers; `any_ip`: also every IP literal
  (a server bound to all interfaces is reached by any of its addresses; an IP literal cannot be
  rebound); `anything`: no check (--allowed_hosts='*')."""
  names: frozenset = frozenset({"127.0.0.1", "localhost", "::1"})
  any_ip: bool = False
  anything: bool = False

  def allows(self, hostname: str) -> bool:
    if self.anything or hostname in self.names:
      return True
    if self.any_ip:
      try:
        ipaddress.ip_address(hostname)
        return True
      except ValueError:
        return False
    return False


def host_allow_list(bound: str, extra=()) -> HostAllowList:
  """The names that reach a server bound to `bound`: that address; for loopback also localhost;
  for all interfaces (0.0.0.0, ::) any IP literal and this machine's name; plus `extra`."""
  extra = [h.strip().lower() for h in extra if h.strip()]
  if "*" in extra:
    return HostAllowList(anything=True)
  names = {bound.lower().strip("[]")}
  try:
    ip = ipaddress.ip_address(bound.strip("[]"))
  except ValueError:
    ip = None
  wildcard = ip is not None and ip.is_unspecified
  if wildcard or (ip is not None and ip.is_loopback) or bound == "localhost":
    names |= {"localhost", "127.0.0.1", "::1"}
  if wildcard:
    names.add(socket.gethostname().lower())
  return HostAllowList(names=frozenset(names | set(extra)), any_ip=wildcard)


def split_host(host: str) -> str:
  """"127.0.0.1:8000" -> "127.0.0.1"; "[::1]:8000" -> "::1"; lowercase."""
  host = host.strip().lower()
  if host.startswith("["):
    return host[1:host.find("]")] if "]" in host else host[1:]
  return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _origin_netloc(origin: str) -> str | None:
  scheme, sep, rest = origin.partition("://")
  if not sep or scheme not in ("http", "https") or not rest:
    return None  # "null" (a sandboxed or file: page) and anything odd: never the same origin
  return _without_default_port(rest.split("/", 1)[0])


def _without_default_port(host: str) -> str:
  host = host.strip().lower()
  return host[:-3] if host.endswith(":80") else host[:-4] if host.endswith(":443") else host


PAGE_PATHS = ("/", "/favicon.ico")  # with /static/...: what a browser may load from anywhere


class BrowserGuard:
  """Pure ASGI middleware for a server without a key: refuses (403) a Host it does not answer to
  and requests a browser marks as cross-origin (the page itself is same-origin), and (415) a JSON
  route's body without `Content-Type: application/json`. Answers in the API's error shape."""

  def __init__(self, app, hosts: HostAllowList):
    self.app, self.hosts = app, hosts

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    headers = {}
    for k, v in scope["headers"]:
      if k in (b"host", b"origin", b"sec-fetch-site", b"content-type"):
        headers[k] = v.decode("latin-1")
    host = headers.get(b"host")
    refusal = None
    if host is not None and not self.hosts.allows(split_host(host)):
      refusal = (403, f"this server does not answer to the host name {split_host(host)!r} (a DNS-rebinding page "
                      "would use one); start it with --allowed_hosts=NAME to allow it, or with an --api_key",
                 "host_not_allowed")
    path = scope.get("path", "")
    if refusal is None and not (path in PAGE_PATHS or path.startswith("/static/")):
      origin = headers.get(b"origin")
      site = headers.get(b"sec-fetch-site", "")
      if (origin is not None and _origin_netloc(origin) != _without_default_port(host or "")) or \
          site in ("cross-site", "same-site"):
        refusal = (403, f"cross-origin requests from a web page ({origin or site}) are refused by a server without an "
                        "API key; start it with --api_key to serve other origins", "cross_origin")
      elif scope["method"] == "POST":
        ctype = headers.get(b"content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
          refusal = (415, f"send the body as JSON with 'Content-Type: application/json' (got {ctype or 'none'!r})",
                     "unsupported_media_type")
    if refusal is None:
      return await self.app(scope, receive, send)
    status, message, code = refusal
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
