"""The HTTP layer: FastAPI routes that authenticate, parse and validate, hand `Sequence`s to each
model's `Engine`, and turn its events into OpenAI responses (one JSON body, or SSE chunks).

  app = create_app([ServedModel(...), ...], api_key=..., db_path="arena.sqlite")

Public: the page (/ and /static), /health and /metrics. Everything else needs the API key when the
server has one (`Authorization: Bearer <key>`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import os
import threading
import time
import uuid

from absl import logging
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm_jax.data.chat_template import CHAT_TEMPLATE
from llm_jax.infer import chat
from llm_jax.serve import protocol, tokens as tokens_lib
from llm_jax.serve.arena import WINNERS, Arena
from llm_jax.serve.protocol import ApiError, GenRequest
from llm_jax.serve.scheduler import Engine, Sequence

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


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


def _sse(obj) -> str:
  return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def _error_response(e: ApiError) -> JSONResponse:
  return JSONResponse(e.body(), status_code=e.status)


class _Choice:
  """What one choice has produced so far (the non-streaming response is built from it)."""

  def __init__(self, chat: bool):
    self.chat = chat
    self.text, self.tokens, self.logprobs, self.tops, self.offsets = [], [], [], [], []
    self.prompt_logprobs = self.prompt_tops = None
    self.finish_reason, self.completion_tokens, self.error = None, 0, None
    self.echo_sent = False


def create_app(models: list[ServedModel], *, api_key: str | None = None, db_path: str = "arena.sqlite",
               max_body_bytes: int = 8 << 20, arena_seed: int | None = None) -> FastAPI:
  by_name = {m.name: m for m in models}
  arena = Arena(db_path, [m.name for m in models], seed=arena_seed)

  @contextlib.asynccontextmanager
  async def lifespan(_):
    yield
    arena.close()

  app = FastAPI(title="llm_jax", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
  app.state.models, app.state.arena = by_name, arena
  http_counts: dict[tuple[str, int], int] = {}
  routes: set = set()  # paths counted by name in /metrics (others as "other")
  started = time.time()

  # ---- plumbing: status counting, errors, auth, body ------------------------------------------

  app.add_middleware(_CountStatus, counts=http_counts, routes=routes)

  @app.exception_handler(ApiError)
  async def api_error(_, e: ApiError):
    return _error_response(e)

  @app.exception_handler(StarletteHTTPException)
  async def http_error(_, e: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return _error_response(ApiError(e.status_code, str(e.detail), None, code=code))

  @app.exception_handler(Exception)
  async def internal_error(_, e: Exception):
    logging.exception("unhandled error in a request")
    return _error_response(ApiError(500, f"internal server error: {type(e).__name__}", None, "server_error"))

  def check_key(request: Request) -> None:
    if not api_key:
      return
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(given.encode(), api_key.encode()):
      raise ApiError(401, "Missing or invalid API key: send the header 'Authorization: Bearer <key>' with the "
                          "key the server was started with (--api_key).", None, code="invalid_api_key")

  async def read_json(request: Request) -> dict:
    check_key(request)
    length = request.headers.get("content-length")
    if length is not None:
      if not length.isdigit():
        raise ApiError(400, "the Content-Length header is not a number", None)
      if int(length) > max_body_bytes:
        raise ApiError(413, f"the request body ({int(length)} bytes) is larger than the server's limit of "
                            f"{max_body_bytes} bytes", None, code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
      body += chunk
      if len(body) > max_body_bytes:
        raise ApiError(413, f"the request body is larger than the server's limit of {max_body_bytes} bytes",
                       None, code="request_too_large")
    try:
      data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
      raise ApiError(400, f"the request body is not valid JSON ({e})", None) from None
    if not isinstance(data, dict):
      raise ApiError(400, "the request body must be a JSON object", None)
    bad = protocol.invalid_text(data)
    if bad is not None:
      raise ApiError(400, f"'{bad}' holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text", bad)
    return data

  def model_of(body: dict) -> ServedModel:
    name = body.get("model")
    if name is None:
      return models[0]  # as llama.cpp: a single-model client need not name it
    if not isinstance(name, str):
      raise ApiError(400, f"'model' must be a string, got {protocol._show(name)}", "model")  # pylint: disable=protected-access
    if name not in by_name:
      raise ApiError(404, f"The model '{name}' does not exist; this server has {sorted(by_name)}", "model",
                     code="model_not_found")
    return by_name[name]

  # ---- generation ------------------------------------------------------------------------------

  sinks: dict = {}  # event loop -> its _LoopSink

  async def generate(request: Request, req: GenRequest, served: ServedModel, shown_name: str):
    loop = asyncio.get_running_loop()
    sink = sinks.get(loop) or sinks.setdefault(loop, _LoopSink(loop))
    queue: asyncio.Queue = asyncio.Queue()

    def emitter(index):
      return lambda event: sink.put(queue, (index, event))

    stop_ids = frozenset() if req.ignore_eos else frozenset(chat.end_of_turn_ids(served.tok))
    seqs = []
    for p, ids in enumerate(req.prompts):
      for i in range(req.n):
        seqs.append(Sequence(prompt=ids, sampling=req.choice_sampling(i), emit=emitter(p * req.n + i),
                             stop_ids=stop_ids, stop_strings=req.stop, logprobs=req.logprobs,
                             echo=req.echo and req.logprobs is not None))
    # Echoed prompts are returned as text, with each token's offset in it.
    echo_texts = [tokens_lib.prompt_offsets(served.tok, ids) for ids in req.prompts] if req.echo else None
    if not served.engine.submit(seqs):
      raise ApiError(429, "the server's queue is full; retry later", None, "server_busy", code="queue_full")
    rid = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    choices = [_Choice(req.kind == "chat") for _ in seqs]
    prompt_tokens = sum(len(p) for p in req.prompts)
    fmt = _Formatter(req, served, shown_name, rid, created, echo_texts)

    if req.stream:
      return StreamingResponse(_stream(served.engine, seqs, queue, choices, fmt, prompt_tokens),
                               media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    remaining = len(seqs)
    try:
      while remaining:
        try:
          index, ev = await asyncio.wait_for(queue.get(), 0.5)
        except asyncio.TimeoutError:
          if await request.is_disconnected():
            return JSONResponse({}, status_code=499)  # nobody reads it; the finally frees the slots
          continue
        remaining -= _apply(choices[index], ev)
    finally:
      if remaining:
        served.engine.cancel(seqs)
    errors = [c.error for c in choices if c.error]
    if errors:
      raise ApiError(500, errors[0], None, "server_error")
    return JSONResponse(fmt.full(choices, prompt_tokens))

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    body = await read_json(request)
    served = model_of(body)
    req = protocol.parse_chat(body, served.name, served.tok, served.context)
    return await generate(request, req, served, served.name)

  @app.post("/v1/completions")
  async def completions(request: Request):
    body = await read_json(request)
    served = model_of(body)
    req = protocol.parse_completion(body, served.name, served.tok, served.context, served.engine.cfg.vocab_size)
    return await generate(request, req, served, served.name)

  # ---- models, tokenizer, health, metrics ---------------------------------------------------------

  def model_card(m: ServedModel) -> dict:
    return {"id": m.name, "object": "model", "created": m.created, "owned_by": "llm_jax",
            "max_model_len": m.context}

  @app.get("/v1/models")
  async def list_models(request: Request):
    check_key(request)
    return {"object": "list", "data": [model_card(m) for m in models]}

  @app.get("/v1/models/{name:path}")
  async def get_model(request: Request, name: str):
    check_key(request)
    return model_card(model_of({"model": name}))

  @app.get("/tokenizer_info")
  async def tokenizer_info(request: Request, model: str | None = None):
    check_key(request)
    m = model_of({"model": model})
    tok = m.tok
    text = lambda i: None if i is None else tok.id_to_token(i)
    return {"tokenizer_class": type(tok).__name__, "eos_token": text(tok.eos_id),
            "bos_token": text(getattr(tok, "bos_id", None)), "pad_token": text(tok.pad_id),
            "chat_template": CHAT_TEMPLATE if tok.im_start_id is not None else None,
            "model_max_length": m.context, "vocab_size": m.engine.cfg.vocab_size}

  @app.post("/tokenize")
  async def tokenize(request: Request):
    body = await read_json(request)
    m = model_of(body)
    if "messages" in body:
      ids = chat.prompt_ids(m.tok, protocol.messages_of(body))
    else:
      if not isinstance(body.get("prompt"), str):
        raise ApiError(400, "'prompt' must be a string (or send 'messages')", "prompt")
      ids = tokens_lib.encode_raw(m.tok, body["prompt"])
    out = {"count": len(ids), "max_model_len": m.context, "tokens": ids}
    if protocol.boolean(body, "return_token_strs", False):
      out["token_strs"] = [m.token_str(i) for i in ids]
    return out

  @app.post("/detokenize")
  async def detokenize(request: Request):
    body = await read_json(request)
    m = model_of(body)
    ids = body.get("tokens")
    vocab = m.engine.cfg.vocab_size
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab
                                            for i in ids):
      raise ApiError(400, f"'tokens' must be a list of token ids in [0, {vocab})", "tokens")
    return {"prompt": m.tok.decode(ids)}

  @app.get("/health")
  async def health():
    return {"status": "ok", "models": list(by_name), "uptime_s": round(time.time() - started, 1)}

  @app.get("/metrics")
  async def metrics(format: str = "prometheus"):  # pylint: disable=redefined-builtin
    snap = {m.name: m.engine.snapshot() for m in models}
    if format == "json":
      return {"models": snap, "http": [{"path": p, "status": s, "count": c} for (p, s), c in http_counts.items()]}
    return PlainTextResponse(_prometheus(snap, http_counts), media_type="text/plain; version=0.0.4")

  # ---- the page and the arena ------------------------------------------------------------------

  @app.get("/")
  async def index():
    return FileResponse(os.path.join(STATIC_DIR, "index.html"), media_type="text/html; charset=utf-8")

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
    body = await read_json(request)
    battle, side = body.get("battle_id"), body.get("side")
    if side not in ("a", "b"):
      raise ApiError(400, f"'side' must be \"a\" or \"b\", got {protocol._show(side)}", "side")  # pylint: disable=protected-access
    name = arena.model_of(battle, side) if isinstance(battle, str) else None
    if name is None:
      raise ApiError(404, "unknown 'battle_id'; start one with POST /arena/battle", "battle_id")
    served = by_name[name]
    body = {k: v for k, v in body.items() if k not in ("model", "battle_id", "side", "n")}
    req = protocol.parse_chat(body, name, served.tok, served.context)
    return await generate(request, req, served, f"model-{side}")

  @app.post("/arena/vote")
  async def arena_vote(request: Request):
    body = await read_json(request)
    winner = body.get("winner")
    if winner not in WINNERS:
      raise ApiError(400, f"'winner' must be one of {list(WINNERS)}, got {protocol._show(winner)}", "winner")  # pylint: disable=protected-access
    prompt = body.get("prompt") if isinstance(body.get("prompt"), str) else ""
    battle = body.get("battle_id")
    try:
      a, b = arena.vote(battle if isinstance(battle, str) else "", winner, prompt[:10_000])
    except KeyError:
      raise ApiError(404, "unknown 'battle_id'; start one with POST /arena/battle", "battle_id") from None
    except ValueError as e:
      raise ApiError(409, str(e), "battle_id", code="already_voted") from None
    return {"model_a": a, "model_b": b, "leaderboard": arena.leaderboard()}

  @app.get("/arena/leaderboard")
  async def arena_leaderboard(request: Request):
    check_key(request)
    board = arena.leaderboard()
    return {"leaderboard": board, "votes": sum(r["battles"] for r in board) // 2}

  routes.update(r.path for r in app.routes if hasattr(r, "path"))
  return app


class _LoopSink:
  """Hands engine events to the event loop's queues, waking the loop once per batch of events (a
  decode step of 32 rows is one wake-up, not 32) instead of once per event."""

  def __init__(self, loop):
    self.loop, self.items, self.lock, self.scheduled = loop, [], threading.Lock(), False

  def put(self, queue: asyncio.Queue, item) -> None:
    with self.lock:
      self.items.append((queue, item))
      if self.scheduled:
        return
      self.scheduled = True
    try:
      self.loop.call_soon_threadsafe(self._flush)
    except RuntimeError:  # the event loop is gone (server shutting down)
      pass

  def _flush(self) -> None:
    with self.lock:
      items, self.items, self.scheduled = self.items, [], False
    for queue, item in items:
      queue.put_nowait(item)


class _CountStatus:
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


def _apply(c: _Choice, ev: dict) -> int:
  """Adds an engine event to a choice; returns 1 when the choice is over."""
  kind = ev["type"]
  if kind == "delta":
    if ev.get("stop_token") and c.chat:
      return 0  # chat log-probs cover the message only (OpenAI); completions keep the end token
    c.text.append(ev["text"])
    c.tokens += ev["tokens"]
    c.offsets += ev["offsets"]
    if "logprobs" in ev:
      c.logprobs += ev["logprobs"]
      c.tops += ev["top"]
    return 0
  if kind == "prompt":
    c.prompt_logprobs, c.prompt_tops = ev["logprobs"], ev["top"]
    return 0
  if kind == "done":
    c.finish_reason, c.completion_tokens = ev["finish_reason"], ev["completion_tokens"]
    return 1
  c.error = ev.get("message", "error")
  return 1


async def _stream(engine: Engine, seqs, queue: asyncio.Queue, choices: list[_Choice], fmt: "_Formatter",
                  prompt_tokens: int):
  remaining = len(seqs)
  try:
    for chunk in fmt.opening(len(seqs)):
      yield _sse(chunk)
    while remaining:
      index, ev = await queue.get()
      c = choices[index]
      done = _apply(c, ev)
      remaining -= done
      if c.error:
        yield _sse(ApiError(500, c.error, None, "server_error").body())
        return
      chunk = fmt.chunk(index, ev, c)
      if chunk is not None:
        yield _sse(chunk)
    if fmt.req.include_usage:
      yield _sse(fmt.usage_chunk(choices, prompt_tokens))
    yield "data: [DONE]\n\n"
  finally:
    if remaining:  # the client went away (or an error ended the stream): free the slots
      engine.cancel(seqs)


class _Formatter:
  """OpenAI response shapes for one request."""

  def __init__(self, req: GenRequest, served: ServedModel, name: str, rid: str, created: int, echo_texts):
    self.req, self.served, self.name, self.rid, self.created = req, served, name, rid, created
    self.echo_texts = echo_texts
    self.chat = req.kind == "chat"
    self.object = "chat.completion" if self.chat else "text_completion"

  def _head(self, obj: str) -> dict:
    return {"id": self.rid, "object": obj, "created": self.created, "model": self.name,
            "system_fingerprint": None}

  def _usage(self, choices, prompt_tokens) -> dict:
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}

  # -- log-probs --
  def _top_dict(self, top) -> dict | None:
    if top is None:
      return None
    return {self.served.token_str(i): lp for i, lp in top}

  def _chat_logprobs(self, tokens, logprobs, tops) -> dict:
    s = self.served.token_str
    entry = lambda i, lp: {"token": s(i), "logprob": lp, "bytes": list(s(i).encode("utf-8"))}
    return {"content": [dict(entry(i, lp), top_logprobs=[entry(j, lq) for j, lq in top])
                        for i, lp, top in zip(tokens, logprobs, tops)], "refusal": None}

  def _completion_logprobs(self, tokens, logprobs, tops, offsets) -> dict:
    return {"tokens": [self.served.token_str(i) for i in tokens], "token_logprobs": list(logprobs),
            "top_logprobs": [self._top_dict(t) for t in tops], "text_offset": list(offsets)}

  def _prompt_part(self, index: int, c: _Choice):
    """(text, logprobs dict parts) of the echoed prompt of choice `index`."""
    text, offsets = self.echo_texts[index // self.req.n]
    ids = self.req.prompts[index // self.req.n]
    if self.req.logprobs is None:
      return text, None
    lps = c.prompt_logprobs or [None] * len(ids)
    tops = c.prompt_tops or [None] * len(ids)
    return text, (ids, lps, tops, offsets)

  # -- whole responses --
  def full(self, choices: list[_Choice], prompt_tokens: int) -> dict:
    out = self._head(self.object)
    items = []
    for index, c in enumerate(choices):
      text = "".join(c.text)
      if self.chat:
        lp = self._chat_logprobs(c.tokens, c.logprobs, c.tops) if self.req.logprobs is not None else None
        items.append({"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": lp, "finish_reason": c.finish_reason})
        continue
      lp = None
      if self.req.echo:
        ptext, part = self._prompt_part(index, c)
        if part is not None:
          ids, lps, tops, offs = part
          lp = self._completion_logprobs(ids, lps, tops, offs)
        base = len(ptext)
        text = ptext + text
      else:
        base = 0
      if self.req.logprobs is not None:
        gen = self._completion_logprobs(c.tokens, c.logprobs, c.tops, [base + o for o in c.offsets])
        lp = gen if lp is None else {k: lp[k] + gen[k] for k in lp}
      items.append({"text": text, "index": index, "logprobs": lp, "finish_reason": c.finish_reason})
    out["choices"] = items
    out["usage"] = self._usage(choices, prompt_tokens)
    return out

  # -- streaming --
  def _chunk(self, choices: list[dict]) -> dict:
    out = self._head(self.object + ("" if not self.chat else ".chunk"))
    out["choices"] = choices
    if self.req.include_usage:
      out["usage"] = None
    return out

  def opening(self, n_choices: int) -> list[dict]:
    if self.chat:  # the first delta of each choice carries the role
      return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None}]) for i in range(n_choices)]
    return []

  def chunk(self, index: int, ev: dict, c: _Choice) -> dict | None:
    kind = ev["type"]
    if kind == "prompt":
      return None  # sent with the first completion chunk (below)
    if self.chat:
      if ev.get("stop_token"):
        return None
      if kind == "done":
        return self._chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason}])
      want_lp = self.req.logprobs is not None and ev["tokens"]
      if not ev["text"] and not want_lp:
        return None  # text held back (a partial character or a possible stop string)
      lp = self._chat_logprobs(ev["tokens"], ev["logprobs"], ev["top"]) if want_lp else None
      return self._chunk([{"index": index, "delta": {"content": ev["text"]}, "logprobs": lp,
                           "finish_reason": None}])
    text, base, lp = ("", 0, None) if kind == "done" else (ev["text"], 0, None)
    if self.req.echo:
      ptext, part = self._prompt_part(index, c)
      base = len(ptext)
      if not c.echo_sent:  # the prompt opens the choice's first chunk
        c.echo_sent = True
        text = ptext + text
        if part is not None:
          lp = self._completion_logprobs(*part)
    if kind != "done" and self.req.logprobs is not None and ev["tokens"]:
      gen = self._completion_logprobs(ev["tokens"], ev["logprobs"], ev["top"], [base + o for o in ev["offsets"]])
      lp = gen if lp is None else {k: lp[k] + gen[k] for k in lp}
    finish = c.finish_reason if kind == "done" else None
    if not text and lp is None and finish is None:
      return None
    return self._chunk([{"text": text, "index": index, "logprobs": lp, "finish_reason": finish}])

  def usage_chunk(self, choices, prompt_tokens) -> dict:
    out = self._head(self.object + ("" if not self.chat else ".chunk"))
    out["choices"] = []
    out["usage"] = self._usage(choices, prompt_tokens)
    return out


def _prometheus(snap: dict, http_counts: dict) -> str:
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
