"""The HTTP layer: FastAPI routes that authenticate, parse and validate (`protocol.py`), hand
`Sequence`s to each model's `Engine` (`scheduler.py`), and answer with its events as OpenAI
responses (`responses.py`: one JSON body, or SSE chunks). /metrics is `metrics.py`'s text.

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
import time
import uuid

from absl import logging
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm_jax.data.chat_template import CHAT_TEMPLATE
from llm_jax.infer import session as session_lib
from llm_jax.serve import protocol, responses, tokens as tokens_lib
from llm_jax.serve.arena import Arena, WINNERS
from llm_jax.serve.metrics import CountStatus, prometheus
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


def _error_response(e: ApiError) -> JSONResponse:
  return JSONResponse(e.body(), status_code=e.status)


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

  app.add_middleware(CountStatus, counts=http_counts, routes=routes)

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
      raise ApiError(400, f"'model' must be a string, got {protocol.show(name)}", "model")
    if name not in by_name:
      raise ApiError(404, f"The model '{name}' does not exist; this server has {sorted(by_name)}", "model",
                     code="model_not_found")
    return by_name[name]

  # ---- generation ------------------------------------------------------------------------------

  sinks: dict = {}  # event loop -> its LoopSink

  async def generate(request: Request, req: GenRequest, served: ServedModel, shown_name: str):
    loop = asyncio.get_running_loop()
    sink = sinks.get(loop) or sinks.setdefault(loop, responses.LoopSink(loop))
    queue: asyncio.Queue = asyncio.Queue()

    def emitter(index):
      return lambda event: sink.put(queue, (index, event))

    stop_ids = frozenset() if req.ignore_eos else frozenset(session_lib.end_of_turn_ids(served.tok))
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
    choices = [responses.Choice(req.kind == "chat") for _ in seqs]
    prompt_tokens = sum(len(p) for p in req.prompts)
    fmt = responses.Formatter(req, served.token_str, shown_name, rid, created, echo_texts)

    if req.stream:
      return StreamingResponse(responses.stream(served.engine, seqs, queue, choices, fmt, prompt_tokens),
                               media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    if not await responses.collect(served.engine, seqs, queue, choices, request.is_disconnected):
      return JSONResponse({}, status_code=499)  # nobody reads it; its sequences are cancelled
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
      ids = session_lib.prompt_ids(m.tok, protocol.messages_of(body))
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
    return PlainTextResponse(prometheus(snap, http_counts), media_type="text/plain; version=0.0.4")

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
      raise ApiError(400, f"'side' must be \"a\" or \"b\", got {protocol.show(side)}", "side")
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
      raise ApiError(400, f"'winner' must be one of {list(WINNERS)}, got {protocol.show(winner)}", "winner")
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
