"""The server against a hostile or unlucky client (issue 26, items 3 to 8), on 127.0.0.1 only:

  3. one large request holds up nobody (tokenizing off the event loop, bounds checked before it,
     every program compiled at warm-up, a maximal request shares the engine by turns);
  4. JSON nested 2,000 deep is a 400, and the server's own errors are counted in /metrics;
  5. slow and dropped uploads (raw sockets): 408 and closed, 499 and no traceback, connections bounded;
  6. keep-alive outlasts the 5 s after which the openai/httpx pool drops a connection;
  7. without a key: Host, Origin and Content-Type checked; votes only for shown answers, rate-limited;
     /metrics behind the key; one client cannot fill the queue;
  8. the server listens at once, says it is warming up (503 + Retry-After) and prints its progress.

Every wait is bounded (a hang fails, never blocks) and every check is an order of events, never a
duration: a request "still being processed" is one held at a gate the test opens afterwards.
"""

import concurrent.futures
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import pytest

from llm_jax.serve import guard, slots
from llm_jax.serve.app import ServedModel, create_app
from llm_jax.serve.scheduler import Engine
from llm_jax.serve.server import BackgroundServer
from llm_jax.serve.startup import Startup
from tests import serve_testlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = serve_testlib.API_KEY
AUTH = {"Authorization": f"Bearer {KEY}"}
MARS = "What is the capital of Mars?"
MARS_ANSWER = "The capital of Mars is Olympus City."
IDLE_S = 6.0  # longer than httpx/openai's 5 s pool expiry, and than uvicorn's old 5 s keep-alive


@pytest.fixture(scope="session")
def served(tmp_path_factory):
  yield serve_testlib.session_server(tmp_path_factory)
  serve_testlib.stop_session_server()


@pytest.fixture(scope="module")
def idle_connection(served):
  """A connection that made one request at the start of this module and then sat idle; the last
  test uses it again (so the idle time costs no test time of its own)."""
  sock = _connect(served["url"])
  sock.sendall(_head("GET", "/health", served["url"]))
  assert _response(sock)[0] == 200
  yield sock, time.monotonic()
  sock.close()


# ---- raw HTTP ----------------------------------------------------------------------------------------

def _connect(url: str) -> socket.socket:
  host, port = url.split("//")[1].rsplit(":", 1)
  return socket.create_connection((host, int(port)), timeout=30)  # every read: a hang fails in 30 s


def _head(method: str, path: str, url: str, length: int | None = None, headers: dict | None = None) -> bytes:
  lines = [f"{method} {path} HTTP/1.1", f"Host: {url.split('//')[1]}"]
  if length is not None:
    lines += ["Content-Type: application/json", f"Content-Length: {length}"]
  lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
  return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _response(sock: socket.socket) -> tuple[int, dict, bytes]:
  """(status, headers, body) of one response with a Content-Length (not a stream)."""
  data = b""
  while b"\r\n\r\n" not in data:
    chunk = sock.recv(65536)
    if not chunk:
      raise ConnectionError(f"closed after {data[:200]!r}")
    data += chunk
  head, _, body = data.partition(b"\r\n\r\n")
  lines = head.decode("latin-1").split("\r\n")
  headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
  while len(body) < int(headers.get("content-length", 0)):
    chunk = sock.recv(65536)
    if not chunk:
      break
    body += chunk
  return int(lines[0].split()[1]), headers, body


def _closed(sock: socket.socket) -> bool:
  """True once the server has closed the connection (what it sent first is read and dropped)."""
  try:
    while sock.recv(65536):
      pass
  except (ConnectionResetError, BrokenPipeError):
    pass
  return True


def _post(url, path, body, headers=AUTH, **kw):
  return httpx.post(url + path, json=body, headers=headers, timeout=kw.pop("timeout", 60), **kw)


def _error(resp, status, code=None, param="__any__"):
  assert resp.status_code == status, (resp.status_code, resp.text[:500])
  err = resp.json()["error"]
  assert set(err) == {"message", "type", "param", "code"} and err["message"], err
  if code is not None:
    assert err["code"] == code, err
  if param != "__any__":
    assert err["param"] == param, err
  return err


def _http_count(url, path, status) -> int:
  rows = httpx.get(url + "/metrics?format=json", headers=AUTH, timeout=30).json()["http"]
  return sum(r["count"] for r in rows if r["path"] == path and r["status"] == status)


def _engine(served, name="sft") -> Engine:
  return served["app"].state.models[name].engine


def _compiled():
  return (slots.prefill_chunk._cache_size(), slots.decode_step._cache_size())  # pylint: disable=protected-access


class _Records(logging.Handler):

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.records = []

  def emit(self, record):
    self.records.append(record)

  def __enter__(self):
    for name in ("", "uvicorn.error", "uvicorn"):
      logging.getLogger(name).addHandler(self)
    return self

  def __exit__(self, *exc):
    for name in ("", "uvicorn.error", "uvicorn"):
      logging.getLogger(name).removeHandler(self)


# ---- 3. one request holds up nobody --------------------------------------------------------------------

def test_a_large_request_being_tokenized_holds_up_nobody(served, idle_connection):
  """A maximal /tokenize (the prompt-byte limit of text, with every token's string) is held inside
  the tokenizer; meanwhile /health and a short chat of another client both complete, then the large
  one does. (Tokenizing on the event loop froze everyone: 22.6 s for a 5 MB /tokenize.)"""
  url, m = served["url"], served["app"].state.models["sft"]
  limit = served["app"].state.limits.prompt_bytes(m.context)
  marker = "Zorb-gate. "
  text = (marker + "The capital of Mars is Olympus City. " * (limit // 37 + 1))[:limit]
  tok, real_encode = m.tok, m.tok.encode
  entered, release = threading.Event(), threading.Event()

  def gated(t):
    if marker in t:
      entered.set()
      release.wait(120)
    return real_encode(t)

  tok.encode = gated
  try:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      big = pool.submit(_post, url, "/tokenize", {"model": "sft", "prompt": text, "return_token_strs": True},
                        timeout=120)
      assert entered.wait(60), "the large request never reached the tokenizer"
      health = httpx.get(url + "/health", timeout=30)
      chat = _post(url, "/v1/chat/completions", {"model": "sft", "temperature": 0, "messages": [
          {"role": "user", "content": MARS}]}, headers={**AUTH, "X-Forwarded-For": "10.0.0.7"}, timeout=30)
      still_running = not big.done()
      release.set()
      resp = big.result(timeout=120)
  finally:
    release.set()
    del tok.encode
  assert health.status_code == 200 and health.json()["status"] == "ok"
  assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == MARS_ANSWER
  assert still_running  # both answered while the large request was inside the tokenizer
  got = resp.json()
  assert resp.status_code == 200 and got["count"] == len(real_encode(text)) == len(got["token_strs"])
  # One byte more is refused before any tokenizing, naming the field and the limit.
  calls = []
  tok.encode = lambda t: calls.append(t) or real_encode(t)
  try:
    err = _error(_post(url, "/tokenize", {"model": "sft", "prompt": text + "x"}), 400, "prompt_too_long", "prompt")
    _error(_post(url, "/v1/completions", {"model": "sft", "prompt": ["hi", text + "x"]}), 400, "prompt_too_long",
           "prompt")
    _error(_post(url, "/v1/chat/completions", {"model": "sft", "messages": [{"role": "user", "content": text + "x"}]}),
           400, "prompt_too_long", "messages")
  finally:
    del tok.encode
  assert str(limit) in err["message"] and not calls


def test_request_bounds_name_their_field(served):
  """Stop strings (count and length) and prompts x n are bounded, each refusal naming its field."""
  url = served["url"]
  chat = {"model": "sft", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
  assert _post(url, "/v1/chat/completions", {**chat, "stop": ["x" * 256] * 16}).status_code == 200
  err = _error(_post(url, "/v1/chat/completions", {**chat, "stop": ["x" * 257]}), 400, param="stop")
  assert "256" in err["message"]
  _error(_post(url, "/v1/chat/completions", {**chat, "stop": ["x"] * 17}), 400, param="stop")
  cmpl = {"model": "sft", "prompt": [[5, 6, 7]] * 16, "max_tokens": 1}
  err = _error(_post(url, "/v1/completions", {**cmpl, "n": 5}), 400, "too_many_choices", "n")
  assert "80 choices" in err["message"] and "64" in err["message"]
  _error(_post(url, "/v1/completions", {**cmpl, "prompt": [[5, 6, 7]] * 64, "n": 2}), 400, "too_many_choices", "n")


def test_a_maximal_generation_shares_the_engine(served):
  """A request at every bound (64 choices, echo with 20 log-probs, 16 stop strings of 256
  characters) from one client, and a short one from another that arrives after it: the short one
  is admitted into a slot before the last of the maximal one's choices (clients take turns), both
  are right, and nothing is compiled. (First come, first served made it wait for all 64.)"""
  url, engine, tok = served["url"], _engine(served), served["app"].state.models["sft"].tok
  prompt = tok.encode("Once upon a time a small robot learned to sing. It sang every morning. " * 3)[:60]
  stops = [chr(0x4e00 + k) * 256 for k in range(16)]  # never generated
  maximal = {"model": "sft", "prompt": [prompt] * 16, "n": 4, "max_tokens": 24, "echo": True, "logprobs": 20,
             "stop": stops, "ignore_eos": True, "temperature": 1.0, "seed": 3}
  compiled = _compiled()
  steps, go = [], threading.Event()

  def hold_first_step(rows):
    steps.append([s for _, s in rows])
    go.wait(60)  # the engine waits here (once) until the other client's request is queued

  engine.on_step = hold_first_step
  try:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      big = pool.submit(_post, url, "/v1/completions", maximal, headers={**AUTH, "X-Forwarded-For": "10.0.0.1"},
                        timeout=300)
      deadline = time.time() + 60
      while not steps and time.time() < deadline and not big.done():
        time.sleep(0.01)
      assert steps, "the maximal request never reached the engine"
      body = {"model": "sft", "temperature": 0, "stream": True, "messages": [{"role": "user", "content": MARS}]}
      with httpx.stream("POST", url + "/v1/chat/completions", json=body,
                        headers={**AUTH, "X-Forwarded-For": "10.0.0.2"}, timeout=60) as short:
        lines = short.iter_lines()
        assert short.status_code == 200 and next(lines).startswith("data: ")  # queued (the engine is held)
        go.set()
        engine.on_step = lambda rows: steps.append([s for _, s in rows])
        text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                       for line in lines if line.startswith("data: {") and '"choices":[{' in line)
      resp = big.result(timeout=300)
  finally:
    go.set()
    engine.on_step = None
  assert text == MARS_ANSWER
  assert resp.status_code == 200, resp.text[:300]
  choices = resp.json()["choices"]
  assert len(choices) == 64 and all(c["finish_reason"] == "length" for c in choices)
  assert all(len(c["logprobs"]["tokens"]) == 60 + 24 and len(c["logprobs"]["top_logprobs"][1]) == 20 for c in choices)
  first = {}  # sequence -> (the first decode step it is in, whether it is one of the maximal request's)
  for k, rows in enumerate(steps):
    for s in rows:
      first.setdefault(id(s), (k, s.max_tokens == 24))
  short_step = min(k for k, maximal in first.values() if not maximal)
  assert short_step < max(k for k, maximal in first.values() if maximal), "the short request waited for all 64"
  assert _compiled() == compiled


def test_one_client_cannot_fill_the_queue(served, monkeypatch):
  """With the engine held, one client queues a maximal request, and a second one of its own gets 429
  (its share of the queue is used); another client's request is still queued. (Two such requests
  used to fill the queue and answer 429 to everyone.)"""
  url, engine = served["url"], _engine(served)
  monkeypatch.setattr(engine, "max_waiting", 112)
  monkeypatch.setattr(engine, "max_waiting_per_owner", 64)
  big = {"model": "sft", "prompt": [[5, 6, 7]] * 16, "n": 4, "max_tokens": 2, "ignore_eos": True}
  held, go = threading.Event(), threading.Event()

  def hold(rows):
    held.set()
    go.wait(60)

  engine.on_step = hold
  try:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      first = pool.submit(_post, url, "/v1/completions", big, headers={**AUTH, "X-Forwarded-For": "10.0.0.3"})
      assert held.wait(60) and engine.snapshot()["waiting"] == 48  # 16 in slots, 48 waiting
      second = _post(url, "/v1/completions", big, headers={**AUTH, "X-Forwarded-For": "10.0.0.3"})
      body = {"model": "sft", "temperature": 0, "stream": True, "messages": [{"role": "user", "content": MARS}]}
      with httpx.stream("POST", url + "/v1/chat/completions", json=body,
                        headers={**AUTH, "X-Forwarded-For": "10.0.0.4"}, timeout=60) as other:
        other_status = other.status_code
        go.set()
        other.read()
      assert first.result(timeout=120).status_code == 200
  finally:
    go.set()
    engine.on_step = None
  err = _error(second, 429, "queue_full")
  assert "share" in err["message"] and second.headers.get("retry-after")
  assert other_status == 200


# ---- 4. deep JSON, the server's own errors --------------------------------------------------------------

def test_deep_json_is_a_400_and_server_errors_are_counted(served, monkeypatch):
  url = served["url"]
  for depth in (100, 2000, 100_000):
    deep = '{"model": "sft", "messages": ' + "[" * depth + "]" * depth + "}"
    for path in ("/v1/chat/completions", "/tokenize"):
      err = _error(_post(url, path, None, content=deep.encode(), headers={**AUTH, "Content-Type": "application/json"}),
                   400, "too_deep", None)
      assert "64 levels" in err["message"]
  nested_ok = {"model": "sft", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
               "user": [[[[[[[[1]]]]]]]]}
  assert _post(url, "/v1/chat/completions", nested_ok).status_code == 200

  def broken():
    raise RuntimeError("a bug")

  before = _http_count(url, "/arena/leaderboard", 500)
  monkeypatch.setattr(served["app"].state.arena, "leaderboard", broken)
  with _Records() as log:
    err = _error(httpx.get(url + "/arena/leaderboard", headers=AUTH, timeout=30), 500)
  assert err["type"] == "server_error" and "RuntimeError" in err["message"]
  assert _http_count(url, "/arena/leaderboard", 500) == before + 1
  text = httpx.get(url + "/metrics", headers=AUTH, timeout=30).text
  assert 'llm_jax_http_responses_total{path="/arena/leaderboard",status="500"}' in text
  tracebacks = [r for r in log.records if r.exc_info]
  assert len(tracebacks) == 1 and "uvicorn" not in tracebacks[0].name  # logged once, by us


# ---- 5. slow and dropped uploads, bounded connections ---------------------------------------------------

def _models(served):
  return list(served["app"].state.models.values())


def test_slow_and_dropped_uploads(served, tmp_path):
  """Raw sockets against a server whose requests must arrive within 1 s: a body that stops halfway
  gets 408 and the connection is closed; a head that never ends and a silent connection are closed;
  20 uploads dropped midway are counted as 499 and log nothing."""
  app = create_app(_models(served), api_key=KEY, db_path=str(tmp_path / "a.sqlite"),
                   limits=guard.Limits(request_timeout_s=1.0))
  with BackgroundServer(app, engines=False) as srv, _Records() as log:
    url = srv.url
    slow = _connect(url)
    slow.sendall(_head("POST", "/v1/chat/completions", url, 1000, AUTH) + b'{"messages": ')
    status, headers, body = _response(slow)
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    assert headers.get("connection") == "close" and _closed(slow)
    endless, silent = _connect(url), _connect(url)
    endless.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    assert _closed(endless) and _closed(silent)
    for _ in range(20):
      s = _connect(url)
      s.sendall(_head("POST", "/v1/chat/completions", url, 100_000, AUTH) + b" " * 1000)
      s.close()
    deadline = time.time() + 60
    while _http_count(url, "/v1/chat/completions", 499) < 20 and time.time() < deadline:
      time.sleep(0.05)
    assert _http_count(url, "/v1/chat/completions", 499) == 20
    metrics = httpx.get(url + "/metrics", headers=AUTH, timeout=30).text
    assert "llm_jax_connections_timed_out_total 2" in metrics  # the endless head and the silent one
  assert not [r for r in log.records if r.exc_info or r.levelno >= logging.ERROR], \
      [r.getMessage()[:200] for r in log.records]


def test_open_connections_are_bounded(served, tmp_path):
  """At 8 connections: 20 silent ones leave 8 open (the longest idle closed first) and a request on
  a new one is answered; with 8 requests in progress a ninth connection is refused (503, Retry-After)."""
  app = create_app(_models(served), api_key=KEY, db_path=str(tmp_path / "b.sqlite"),
                   limits=guard.Limits(max_connections=8, request_timeout_s=600))
  with BackgroundServer(app, engines=False) as srv:
    url = srv.url
    silent = [_connect(url) for _ in range(20)]
    # Accepted in order: by the time a later connection is answered, the server has seen all 20.
    assert httpx.get(url + "/health", timeout=30).status_code == 200  # room made by closing an idle one
    assert all(_closed(s) for s in silent[:12])  # the 9th to the 20th closed the longest idle
    silent[-1].setblocking(False)
    with pytest.raises(BlockingIOError):  # the newest are still open
      silent[-1].recv(1)
    assert srv.open_connections <= 8
    for s in silent:
      s.close()
    busy = []
    for _ in range(8):  # Expect: 100-continue: the server says when the app is reading the body
      s = _connect(url)
      s.sendall(_head("POST", "/v1/chat/completions", url, 1000, {**AUTH, "Expect": "100-continue"}))
      assert s.recv(4096).startswith(b"HTTP/1.1 100")
      s.sendall(b'{"model": ')
      busy.append(s)
    ninth = _connect(url)
    status, headers, body = _response(ninth)
    assert status == 503 and headers.get("retry-after") and json.loads(body)["error"]["code"] == "too_many_connections"
    assert _closed(ninth)
    for s in busy:
      s.close()
    counts = httpx.get(url + "/metrics?format=json", headers=AUTH, timeout=30).json()["connections"]
    assert counts["refused"] == 1 and counts["closed_idle"] >= 12


# ---- 7. without a key ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def open_server(served, tmp_path_factory):
  """The session's models behind a server without a key (and 3 votes a minute per client)."""
  app = create_app(_models(served), db_path=str(tmp_path_factory.mktemp("open") / "votes.sqlite"),
                   hosts=guard.host_allow_list("127.0.0.1", ["myhost.lan"]), limits=guard.Limits(votes_per_minute=3),
                   arena_seed=0)
  with BackgroundServer(app, engines=False) as srv:
    yield srv


def test_without_a_key_other_sites_are_kept_out(open_server):
  url = open_server.url
  port = url.rsplit(":", 1)[1]
  chat = {"model": "sft", "temperature": 0, "max_tokens": 24, "messages": [{"role": "user", "content": MARS}]}
  assert _post(url, "/v1/chat/completions", chat, headers={}).status_code == 200  # a local client: as ever
  # DNS rebinding: a name that resolves to 127.0.0.1 but is not the server's.
  for path in ("/v1/models", "/health", "/"):
    _error(httpx.get(url + path, headers={"Host": f"evil.example:{port}"}, timeout=30), 403, "host_not_allowed")
  for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"myhost.lan:{port}"):
    assert httpx.get(url + "/v1/models", headers={"Host": host}, timeout=30).status_code == 200, host
  # A page of another site: refused by its Origin or Sec-Fetch-Site; the page itself is same-origin.
  _error(_post(url, "/v1/chat/completions", chat, headers={"Origin": "http://evil.example"}), 403, "cross_origin")
  _error(_post(url, "/v1/chat/completions", chat, headers={"Origin": "null"}), 403, "cross_origin")
  _error(_post(url, "/v1/chat/completions", chat, headers={"Sec-Fetch-Site": "cross-site"}), 403, "cross_origin")
  _error(httpx.get(url + "/v1/models", headers={"Origin": f"http://localhost:{int(port) + 1}"}, timeout=30), 403,
         "cross_origin")
  same = _post(url, "/v1/chat/completions", chat, headers={"Origin": url, "Sec-Fetch-Site": "same-origin"})
  assert same.status_code == 200 and same.json()["choices"][0]["message"]["content"] == MARS_ANSWER
  assert httpx.get(url + "/static/app.js", headers={"Sec-Fetch-Site": "cross-site"}, timeout=30).status_code == 200
  # A form or a no-cors fetch cannot send JSON's content type.
  for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
    headers = {"Content-Type": ctype} if ctype else {}
    _error(httpx.post(url + "/v1/chat/completions", content=json.dumps(chat).encode(), headers=headers, timeout=30),
           415, "unsupported_media_type")
  assert httpx.post(url + "/v1/chat/completions", content=json.dumps(chat).encode(),
                    headers={"Content-Type": "application/json; charset=utf-8"}, timeout=60).status_code == 200


def test_votes_need_shown_answers_and_are_rate_limited(open_server):
  url = open_server.url
  ask = {"temperature": 0, "max_tokens": 4, "messages": [{"role": "user", "content": MARS}]}
  battle = _post(url, "/arena/battle", {}, headers={}).json()["battle_id"]
  vote = {"battle_id": battle, "winner": "a"}
  _error(_post(url, "/arena/vote", vote, headers={}), 409, "answers_not_shown", "battle_id")  # 1st vote this minute
  assert _post(url, "/arena/chat", {**ask, "battle_id": battle, "side": "a"}, headers={}).status_code == 200
  _error(_post(url, "/arena/vote", vote, headers={}), 409, "answers_not_shown")  # 2nd
  with httpx.stream("POST", url + "/arena/chat", json={**ask, "battle_id": battle, "side": "b", "stream": True},
                    timeout=60) as r:
    assert r.status_code == 200 and r.read().endswith(b"data: [DONE]\n\n")
  res = _post(url, "/arena/vote", vote, headers={})  # 3rd
  assert res.status_code == 200 and {res.json()["model_a"], res.json()["model_b"]} == {"sft", "weak"}
  limited = _post(url, "/arena/vote", vote, headers={})  # 4th: over 3 a minute
  _error(limited, 429, "rate_limited")
  assert int(limited.headers["retry-after"]) >= 1
  # Another client is not limited by this one (X-Forwarded-For from a local proxy names it).
  _error(_post(url, "/arena/vote", vote, headers={"X-Forwarded-For": "10.0.0.9"}), 409, "already_voted")


def test_metrics_are_behind_the_key(served, open_server):
  _error(httpx.get(served["url"] + "/metrics", timeout=30), 401, "invalid_api_key")
  assert httpx.get(served["url"] + "/metrics", headers=AUTH, timeout=30).status_code == 200
  assert httpx.get(open_server.url + "/metrics", timeout=30).status_code == 200  # no key: open, like the API
  assert httpx.get(served["url"] + "/health", timeout=30).status_code == 200  # liveness stays public


# ---- 8. start-up ------------------------------------------------------------------------------------------------

def test_the_server_answers_while_it_starts(served, tmp_path):
  """In-process, with the loading and the compiling each held at a gate: /health says "loading",
  then "warming_up" with the programs compiled so far (503 and Retry-After), the API answers 503
  with Retry-After and the page loads; once compiled, the same requests succeed."""
  src = _engine(served)
  loading, load_go, compiling, compile_go = (threading.Event() for _ in range(4))
  lines = []

  def load():
    loading.set()
    assert load_go.wait(60)
    engine = Engine(src.params, src.cfg, src.tok, name="sft", n_slots=16, context=src.context, prefill_chunk=64,
                    min_bucket=64)
    return [ServedModel(name="sft", engine=engine, context=src.context)]

  def say(line):
    lines.append(line)
    if "compiled 1/" in line:
      compiling.set()
      assert compile_go.wait(60)

  startup = Startup(["sft"], load=load, say=say, make_app=lambda models: create_app(
      models, api_key=KEY, db_path=str(tmp_path / "s.sqlite"), readiness=startup))
  chat = {"model": "sft", "temperature": 0, "messages": [{"role": "user", "content": MARS}]}
  srv = BackgroundServer(startup).start()
  thread = threading.Thread(target=startup.run, daemon=True)
  thread.start()
  try:
    assert loading.wait(60)
    health = httpx.get(srv.url + "/health", timeout=30)
    assert health.status_code == 503 and health.json()["status"] == "loading" and health.headers["retry-after"]
    resp = _post(srv.url, "/v1/chat/completions", chat)
    _error(resp, 503, "warming_up")
    assert resp.headers["retry-after"]
    load_go.set()
    assert compiling.wait(60)
    health = httpx.get(srv.url + "/health", timeout=30)
    assert health.status_code == 503 and health.headers["retry-after"]
    assert health.json()["status"] == "warming_up" and health.json()["programs"]["compiled"] == 1
    total = health.json()["programs"]["total"]
    assert total == len(startup.models[0].engine.programs()) == 12  # 2 prefill (with/without log-probs), 10 decode
    resp = _post(srv.url, "/v1/chat/completions", chat)
    _error(resp, 503, "warming_up")
    assert int(resp.headers["retry-after"]) >= 1
    assert httpx.get(srv.url + "/", timeout=30).status_code == 200  # the page loads meanwhile
    compile_go.set()
    thread.join(60)
    assert startup.ready
    assert httpx.get(srv.url + "/health", timeout=30).json()["status"] == "ok"
    assert _post(srv.url, "/v1/chat/completions", chat).json()["choices"][0]["message"]["content"] == MARS_ANSWER
  finally:
    load_go.set()
    compile_go.set()
    srv.stop()
    for m in startup.models:
      m.engine.stop()
  progress = [k for k, line in enumerate(lines) if ": compiled " in line]
  assert len(progress) == total and progress == sorted(progress)
  assert "compiled 12/12" in lines[progress[-1]] and "programs compiled in" in lines[progress[-1] + 1]


def test_cli_listens_at_once_and_compiles_every_program(served, tmp_path):
  """`python -m llm_jax.serve`: the listening line comes first and /health answers at once, then a
  line per compiled program, then the banner; after it an echo request with log-probs compiles
  nothing (it used to compile on the engine thread, holding up everyone)."""
  proc = subprocess.Popen([sys.executable, "-m", "llm_jax.serve", f"--workdir={served['runs']['sft']}", "--port=0",
                           "--slots=1", "--prefill_chunk=32", "--max_context=32", f"--db={tmp_path / 'v.sqlite'}"],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  lines, url, first = [], None, None
  try:
    for line in proc.stdout:
      lines.append(line.rstrip("\n"))
      if line.startswith("Listening on "):
        url = line.split()[2]
        first = httpx.get(url + "/health", timeout=30)  # answered whatever the phase
      if "page: " in line:
        break
    assert url, (lines, proc.stderr.read()[-3000:] if proc.poll() is not None else "")
    assert lines[0].startswith("Listening on http://127.0.0.1:")
    assert first.status_code in (200, 503)
    if first.status_code == 503:
      assert first.json()["status"] in ("loading", "warming_up") and first.headers["retry-after"]
    progress = [k for k, line in enumerate(lines) if ": compiled " in line]
    # 2 prefill programs (32 tokens, with and without log-probs) and 1 decode one (1 row, window 32)
    assert len(progress) == 3 and 0 < progress[0] and progress[-1] < len(lines) - 1
    assert httpx.get(url + "/health", timeout=30).json()["status"] == "ok"
    programs = lambda: httpx.get(url + "/metrics?format=json", timeout=30).json()["models"]["sft"]["programs"]
    before = programs()
    r = _post(url, "/v1/completions", {"prompt": MARS, "echo": True, "logprobs": 5, "max_tokens": 2}, headers={})
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"]["token_logprobs"][0] is None
    assert programs() == before == 3
  finally:
    proc.terminate()
    proc.wait(timeout=60)


# ---- 6. keep-alive (last: the connection opened by the first test has been idle since) ------------------------

def test_keep_alive_outlasts_client_pools(served, idle_connection):
  """A connection idle for longer than the openai/httpx pool keeps one (5 s) is still open: the
  server never closes a connection at the moment a client reuses it (uvicorn's default was 5 s)."""
  sock, since = idle_connection
  time.sleep(max(0.0, IDLE_S - (time.monotonic() - since)))
  sock.sendall(_head("GET", "/health", served["url"]))
  status, _, body = _response(sock)
  assert status == 200 and json.loads(body)["status"] == "ok"
