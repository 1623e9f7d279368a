"""The HTTP layer: FastAPI routes that authenticate, parse and validate (`protocol.py`), hand
`Sequence`s to each model's `Engine` (`scheduler.py`), and answer with its events as OpenAI
responses (`responses.py`: one JSON body, or SSE chunks). /metrics is `metrics.py`'s text.

  app = create_app([ServedModel(...), ...], api_key=..., db_path="arena.sqlite", limits=Limits())

Public: the page (/, /favicon.ico and /static) and /health. Everything else needs the API key when the server
has one (`Authorization: Bearer <key>`); without one, `guard.BrowserGuard` keeps other sites' pages
out. Work that grows with the request (JSON parsing, tokenizing, token strings, big response
bodies) runs in a thread pool, never on the event loop: one large request cannot hold up /health
or anyone else's stream. Bodies above 64 KiB get a pool of their own, so a few of them cannot
occupy the threads that small requests need. Until `readiness` says the programs are compiled, the
API answers 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import hmac
import json
import os
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from llm_jax.data.chat_template import CHAT_TEMPLATE
from llm_jax.infer import session as session_lib
from llm_jax.serve import protocol, responses, tokens as tokens_lib
from llm_jax.serve.arena import WINNERS, Arena, NotShown
from llm_jax.serve.guard import BrowserGuard, HostAllowList, Limits, RateLimiter
from llm_jax.serve.metrics import CLIENT_GONE, Connections, CountStatus, prometheus
from llm_jax.serve.protocol import ApiError, GenRequest
from llm_jax.serve.scheduler import Engine, Sequence

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
BULK_BYTES = 64 << 10  # bodies above this are parsed and tokenized in the bulk pool


@dataclasses.dataclass
class ServedModel:
  name: str
  engine: Engine
  context: int  # longest prompt + max_tokens a request may ask for
  workdir: str = ""
  created: int = dataclasses.field(default_factory=lambda: int(time.time()))
  _token_strs: dict = dataclasses.field(default_factory=dict)

  @property
  def tok(self):
    return self.engine.tok

  def token_str(self, i: int) -> str:
    s = self._token_strs.get(i)
    if s is None:
      s = self._token_strs[i] = tokens_lib.token_str(self.tok, i)
    return s


def _error_response(e: ApiError) -> JSONResponse:
  return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _ClientGone(Exception):
  """The client went away while sending its request: nobody to answer (counted as 499, not logged)."""


def _json_bytes(obj) -> bytes:
  return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def create_app(models: list[ServedModel], *, api_key: str | None = None, db_path: str = "arena.sqlite",
               max_body_bytes: int | None = None, arena_seed: int | None = None, limits: Limits | None = None,
               hosts: HostAllowList | None = None, readiness=None, connections: Connections | None = None,
               http_counts: dict | None = None) -> FastAPI:
  """The app serving `models`. `limits` bound requests (`max_body_bytes`, if given, overrides its
  body bound); `hosts` are the Host names answered without a key (default: loopback names);
  `readiness` (an object with `ready`, `health()` and `retry_after()`, see startup.py) holds the
  API at 503 until it is ready (None: ready now); `connections` and `http_counts` are the figures
  /metrics reports (shared with the connection layer and the start-up gate when they count too)."""
  limits = limits or Limits()
  if max_body_bytes is not None:
    limits = dataclasses.replace(limits, max_body_bytes=max_body_bytes)
  max_body_bytes = limits.max_body_bytes
  by_name = {m.name: m for m in models}
  arena = Arena(db_path, [m.name for m in models], seed=arena_seed)
  votes = RateLimiter(limits.votes_per_minute)
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="llm_jax-serve")
  bulk_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="llm_jax-serve-bulk")

  @contextlib.asynccontextmanager
  async def lifespan(_):
    yield
    close()

  def close() -> None:
    arena.close()
    pool.shutdown(wait=False, cancel_futures=True)
    bulk_pool.shutdown(wait=False, cancel_futures=True)

  app = FastAPI(title="llm_jax", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
  app.state.models, app.state.arena, app.state.limits = by_name, arena, limits
  app.state.connections = connections = connections if connections is not None else Connections()
  app.state.http_counts = http_counts = http_counts if http_counts is not None else {}
  app.state.close = close  # for a server that never ran this app's lifespan (startup.py)
  routes: set = set()  # paths counted by name in /metrics (others as "other")
  started = time.time()

  # ---- plumbing: status counting, errors, auth, body ------------------------------------------

  if not api_key:
    app.add_middleware(BrowserGuard, hosts=hosts or HostAllowList())
  app.add_middleware(CountStatus, counts=http_counts, routes=routes)  # outermost: counts the guard's answers

  @app.exception_handler(ApiError)
  async def api_error(_, e: ApiError):
    return _error_response(e)

  @app.exception_handler(_ClientGone)
  async def client_gone(_, e: _ClientGone):
    return Response(status_code=CLIENT_GONE)  # sent nowhere; counted

  @app.exception_handler(StarletteHTTPException)
  async def http_error(_, e: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return _error_response(ApiError(e.status_code, str(e.detail), None, code=code))

  async def off_loop(size: int, fn, *args, **kwargs):
    """fn(*args, **kwargs) in a worker thread (the bulk pool for bodies over BULK_BYTES)."""
    chosen = bulk_pool if size > BULK_BYTES else pool
    return await asyncio.get_running_loop().run_in_executor(chosen, functools.partial(fn, *args, **kwargs))

  def admit(request: Request) -> None:
    """An API request: 503 while the server warms up, 401 without the key (if it has one)."""
    if readiness is not None and not readiness.ready:
      raise ApiError(503, f"the server is starting ({readiness.health()['detail']}); retry shortly", None,
                     "server_error", code="warming_up", headers={"Retry-After": str(readiness.retry_after())})
    check_key(request)

  def check_key(request: Request) -> None:
    if not api_key:
      return
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(given.encode(), api_key.encode()):
      raise ApiError(401, "Missing or invalid API key: send the header 'Authorization: Bearer <key>' with the "
                          "key the server was started with (--api_key).", None, code="invalid_api_key")

  async def read_body(request: Request) -> bytes:
    """The body, within the size limit and the time limit (a client sending slowly holds a
    connection, never a thread); a client that hangs up while sending is nobody to answer."""
    closing = {"Connection": "close"}  # what is left of the body is not read: the connection cannot go on
    length = request.headers.get("content-length")
    if length is not None:
      if not length.isdigit():
        raise ApiError(400, "the Content-Length header is not a number", None, headers=closing)
      if int(length) > max_body_bytes:
        raise ApiError(413, f"the request body ({int(length)} bytes) is larger than the server's limit of "
                            f"{max_body_bytes} bytes", None, code="request_too_large", headers=closing)
    body = bytearray()
    try:
      async with asyncio.timeout(limits.request_timeout_s):
        async for chunk in request.stream():
          body += chunk
          if len(body) > max_body_bytes:
            raise ApiError(413, f"the request body is larger than the server's limit of {max_body_bytes} bytes",
                           None, code="request_too_large", headers=closing)
    except TimeoutError:
      raise ApiError(408, f"the request body did not arrive within {limits.request_timeout_s:g} s "
                          f"({len(body)} bytes came)", None, code="request_timeout", headers=closing) from None
    except ClientDisconnect:
      raise _ClientGone() from None
    return bytes(body)

  async def read_json(request: Request) -> tuple[dict, int]:
    """(the body as a JSON object, its size in bytes), parsed off the event loop."""
    admit(request)
    body = await read_body(request)
    return await off_loop(len(body), protocol.parse_body, body), len(body)

  def model_of(body: dict) -> ServedModel:
    name = body.get("model")
    if name is None:
      return models[0]  # as llama.cpp: a single-model client need not name it
    if not isinstance(name, str):
      raise ApiError(400, f"'model' must be a string, got {protocol.show(name)}", "model")
    if name not in by_name:
      raise ApiError(404, f"The model '{name}' does not exist; this server has {sorted(by_name)}", "model",
                     code="model_not_found")
    return by_name[name]

  # ---- generation ------------------------------------------------------------------------------

  sinks: dict = {}  # event loop -> its LoopSink

  def parse_chat(body: dict, served: ServedModel) -> GenRequest:
    return protocol.parse_chat(body, served.name, served.tok, served.context,
                               max_prompt_bytes=limits.prompt_bytes(served.context), max_choices=limits.max_choices)

  def parse_completion(body: dict, served: ServedModel) -> GenRequest:
    return protocol.parse_completion(body, served.name, served.tok, served.context, served.engine.cfg.vocab_size,
                                     max_prompt_bytes=limits.prompt_bytes(served.context),
                                     max_choices=limits.max_choices)

  async def generate(request: Request, req: GenRequest, served: ServedModel, shown_name: str, size: int,
                     on_shown=None):
    """Runs `req` on the model; `on_shown()` once every choice has been given in full."""
    loop = asyncio.get_running_loop()
    sink = sinks.get(loop) or sinks.setdefault(loop, responses.LoopSink(loop))
    queue: asyncio.Queue = asyncio.Queue()

    def emitter(index):
      return lambda event: sink.put(queue, (index, event))

    stop_ids = frozenset() if req.ignore_eos else frozenset(session_lib.end_of_turn_ids(served.tok))
    owner = request.client.host if request.client else ""
    seqs = []
    for p, ids in enumerate(req.prompts):
      for i in range(req.n):
        seqs.append(Sequence(prompt=ids, sampling=req.choice_sampling(i), emit=emitter(p * req.n + i),
                             stop_ids=stop_ids, stop_strings=req.stop, logprobs=req.logprobs,
                             echo=req.echo and req.logprobs is not None, owner=owner))
    # Echoed prompts are returned as text, with each token's offset in it.
    echo_texts = None
    if req.echo:
      echo_texts = await off_loop(size, lambda: [tokens_lib.prompt_offsets(served.tok, ids) for ids in req.prompts])
    refused = served.engine.submit(seqs)
    if refused:
      raise ApiError(429, refused, None, "server_busy", code="queue_full", headers={"Retry-After": "1"})
    rid = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    choices = [responses.Choice(req.kind == "chat") for _ in seqs]
    prompt_tokens = sum(len(p) for p in req.prompts)
    fmt = responses.Formatter(req, served.token_str, shown_name, rid, created, echo_texts)

    if req.stream:
      async def events():
        async for piece in responses.stream(served.engine, seqs, queue, choices, fmt, prompt_tokens):
          if piece == responses.DONE and on_shown is not None:
            on_shown()  # every answer is out (before [DONE], after which the page may vote at once)
          yield piece

      return StreamingResponse(events(), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    if not await responses.collect(served.engine, seqs, queue, choices, request.is_disconnected):
      return Response(status_code=CLIENT_GONE)  # nobody reads it; its sequences are cancelled
    errors = [c.error for c in choices if c.error]
    if errors:
      raise ApiError(500, errors[0], None, "server_error")
    if req.logprobs is None and len(choices) <= 4:
      content = _json_bytes(fmt.full(choices, prompt_tokens))
    else:  # log-probs of many tokens: a body worth building off the event loop
      content = await off_loop(size, lambda: _json_bytes(fmt.full(choices, prompt_tokens)))
    if on_shown is not None:
      on_shown()
    return Response(content, media_type="application/json")

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    body, size = await read_json(request)
    served = model_of(body)
    req = await off_loop(size, parse_chat, body, served)
    return await generate(request, req, served, served.name, size)

  @app.post("/v1/completions")
  async def completions(request: Request):
    body, size = await read_json(request)
    served = model_of(body)
    req = await off_loop(size, parse_completion, body, served)
    return await generate(request, req, served, served.name, size)

  # ---- models, tokenizer, health, metrics ---------------------------------------------------------

  def model_card(m: ServedModel) -> dict:
    return {"id": m.name, "object": "model", "created": m.created, "owned_by": "llm_jax",
            "max_model_len": m.context}

  @app.get("/v1/models")
  async def list_models(request: Request):
    admit(request)
    return {"object": "list", "data": [model_card(m) for m in models]}

  @app.get("/v1/models/{name:path}")
  async def get_model(request: Request, name: str):
    admit(request)
    return model_card(model_of({"model": name}))

  @app.get("/tokenizer_info")
  async def tokenizer_info(request: Request, model: str | None = None):
    admit(request)
    m = model_of({"model": model})
    tok = m.tok
    text = lambda i: None if i is None else tok.id_to_token(i)
    return {"tokenizer_class": type(tok).__name__, "eos_token": text(tok.eos_id),
            "bos_token": text(getattr(tok, "bos_id", None)), "pad_token": text(tok.pad_id),
            "chat_template": CHAT_TEMPLATE if tok.im_start_id is not None else None,
            "model_max_length": m.context, "vocab_size": m.engine.cfg.vocab_size}

  def tokenize_body(body: dict, m: ServedModel) -> bytes:
    max_bytes = limits.prompt_bytes(m.context)
    if "messages" in body:
      messages = protocol.messages_of(body)
      protocol.check_prompt_bytes(sum(len(x["content"].encode("utf-8")) for x in messages), max_bytes,
                            "messages", "'messages' hold")
      ids = session_lib.prompt_ids(m.tok, messages)
    else:
      if not isinstance(body.get("prompt"), str):
        raise ApiError(400, "'prompt' must be a string (or send 'messages')", "prompt")
      protocol.check_prompt_bytes(len(body["prompt"].encode("utf-8")), max_bytes, "prompt", "'prompt' holds")
      ids = tokens_lib.encode_raw(m.tok, body["prompt"])
    out = {"count": len(ids), "max_model_len": m.context, "tokens": ids}
    if protocol.boolean(body, "return_token_strs", False):
      out["token_strs"] = [m.token_str(i) for i in ids]
    return _json_bytes(out)

  @app.post("/tokenize")
  async def tokenize(request: Request):
    body, size = await read_json(request)
    m = model_of(body)
    return Response(await off_loop(size, tokenize_body, body, m), media_type="application/json")

  def detokenize_body(body: dict, m: ServedModel) -> bytes:
    ids = body.get("tokens")
    vocab = m.engine.cfg.vocab_size
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab
                                            for i in ids):
      raise ApiError(400, f"'tokens' must be a list of token ids in [0, {vocab})", "tokens")
    return _json_bytes({"prompt": m.tok.decode(ids)})

  @app.post("/detokenize")
  async def detokenize(request: Request):
    body, size = await read_json(request)
    m = model_of(body)
    return Response(await off_loop(size, detokenize_body, body, m), media_type="application/json")

  @app.get("/health")
  async def health():
    if readiness is not None and not readiness.ready:
      return JSONResponse(readiness.health(), status_code=503, headers={"Retry-After": str(readiness.retry_after())})
    return {"status": "ok", "models": list(by_name), "uptime_s": round(time.time() - started, 1)}

  @app.get("/metrics")
  async def metrics(request: Request, format: str = "prometheus"):  # pylint: disable=redefined-builtin
    check_key(request)  # with a key, the figures (model names, load) are for those who have it
    snap = {m.name: m.engine.snapshot() for m in models}
    if format == "json":
      return {"models": snap, "http": [{"path": p, "status": s, "count": c} for (p, s), c in http_counts.items()],
              "connections": dataclasses.asdict(connections)}
    return PlainTextResponse(prometheus(snap, http_counts, connections), media_type="text/plain; version=0.0.4")

  # ---- the page and the arena ------------------------------------------------------------------

  @app.get("/")
  async def index():
    return FileResponse(os.path.join(STATIC_DIR, "index.html"), media_type="text/html; charset=utf-8")

  @app.get("/favicon.ico")
  async def favicon():  # browsers ask for it whatever the page links; a 404 shows in their logs
    return FileResponse(os.path.join(STATIC_DIR, "favicon.ico"), media_type="image/x-icon",
                        headers={"Cache-Control": "public, max-age=86400"})

  app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

  @app.post("/arena/battle")
  async def arena_battle(request: Request):
    await read_json(request)
    try:
      return {"battle_id": arena.new_battle(), "sides": ["a", "b"]}
    except ValueError as e:
      raise ApiError(400, str(e), None) from None

  @app.post("/arena/chat")
  async def arena_chat(request: Request):
    """A chat completion from one hidden side of a battle; the reply names the side, not the model."""
    body, size = await read_json(request)
    battle, side = body.get("battle_id"), body.get("side")
    if side not in ("a", "b"):
      raise ApiError(400, f"'side' must be \"a\" or \"b\", got {protocol.show(side)}", "side")
    name = arena.model_of(battle, side) if isinstance(battle, str) else None
    if name is None:
      raise ApiError(404, "unknown 'battle_id'; start one with POST /arena/battle", "battle_id")
    served = by_name[name]
    body = {k: v for k, v in body.items() if k not in ("model", "battle_id", "side", "n")}
    req = await off_loop(size, parse_chat, body, served)
    return await generate(request, req, served, f"model-{side}", size, on_shown=lambda: arena.shown(battle, side))

  @app.post("/arena/vote")
  async def arena_vote(request: Request):
    body, _ = await read_json(request)
    wait = votes.take(request.client.host if request.client else "")
    if wait:
      raise ApiError(429, f"too many votes from this client (at most {limits.votes_per_minute} a minute); retry in "
                          f"{wait:.0f} s", None, "rate_limit_error", code="rate_limited",
                     headers={"Retry-After": str(max(1, round(wait)))})
    winner = body.get("winner")
    if winner not in WINNERS:
      raise ApiError(400, f"'winner' must be one of {list(WINNERS)}, got {protocol.show(winner)}", "winner")
    prompt = body.get("prompt") if isinstance(body.get("prompt"), str) else ""
    battle = body.get("battle_id")
    try:
      a, b = arena.vote(battle if isinstance(battle, str) else "", winner, prompt[:10_000])
    except KeyError:
      raise ApiError(404, "unknown 'battle_id'; start one with POST /arena/battle", "battle_id") from None
    except NotShown:
      raise ApiError(409, "this battle's two answers have not both been given in full (POST /arena/chat for sides "
                          "a and b); a vote is for answers that were seen", "battle_id", code="answers_not_shown") from None
    except ValueError as e:
      raise ApiError(409, str(e), "battle_id", code="already_voted") from None
    return {"model_a": a, "model_b": b, "leaderboard": await off_loop(0, arena.leaderboard)}

  @app.get("/arena/leaderboard")
  async def arena_leaderboard(request: Request):
    admit(request)
    board = await off_loop(0, arena.leaderboard)
    return {"leaderboard": board, "votes": sum(r["battles"] for r in board) // 2}

  routes.update(r.path for r in app.routes if hasattr(r, "path"))
  return app
