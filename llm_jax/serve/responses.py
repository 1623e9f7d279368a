"""The response side of the OpenAI API (the request side is `protocol.py`): what each choice has
produced (`Choice`), the response shapes (`Formatter`: one JSON body, or SSE chunks), and the bridge
that carries an `Engine`'s events from its thread to the request's event loop (`LoopSink`, `stream`).

  queue = asyncio.Queue()  # each Sequence's emit: lambda ev: sink.put(queue, (choice_index, ev))
  return StreamingResponse(stream(engine, seqs, queue, choices, fmt, prompt_tokens), ...)
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Callable

from llm_jax.serve.protocol import ApiError, GenRequest
from llm_jax.serve.scheduler import Engine


DONE = "data: [DONE]\n\n"  # the last event of a stream that ended well


def sse(obj) -> str:
  """One server-sent event carrying `obj` as JSON."""
  return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


class Choice:
  """What one choice has produced so far (the non-streaming response is built from it)."""

  def __init__(self, chat: bool):
    self.chat = chat
    self.text, self.tokens, self.logprobs, self.tops, self.offsets = [], [], [], [], []
    self.prompt_logprobs = self.prompt_tops = None
    self.finish_reason, self.completion_tokens, self.error = None, 0, None
    self.echo_sent = False

  def apply(self, ev: dict) -> int:
    """Adds an engine event; returns 1 when the choice is over."""
    kind = ev["type"]
    if kind == "delta":
      if ev.get("stop_token") and self.chat:
        return 0  # chat log-probs cover the message only (OpenAI); completions keep the end token
      self.text.append(ev["text"])
      self.tokens += ev["tokens"]
      self.offsets += ev["offsets"]
      if "logprobs" in ev:
        self.logprobs += ev["logprobs"]
        self.tops += ev["top"]
      return 0
    if kind == "prompt":
      self.prompt_logprobs, self.prompt_tops = ev["logprobs"], ev["top"]
      return 0
    if kind == "done":
      self.finish_reason, self.completion_tokens = ev["finish_reason"], ev["completion_tokens"]
      return 1
    self.error = ev.get("message", "error")
    return 1


class Formatter:
  """OpenAI response shapes for one request."""

  def __init__(self, req: GenRequest, token_str: Callable[[int], str], name: str, rid: str, created: int,
               echo_texts):
    self.req, self.token_str, self.name, self.rid, self.created = req, token_str, name, rid, created
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
    return {self.token_str(i): lp for i, lp in top}

  def _chat_logprobs(self, tokens, logprobs, tops) -> dict:
    s = self.token_str
    entry = lambda i, lp: {"token": s(i), "logprob": lp, "bytes": list(s(i).encode("utf-8"))}
    return {"content": [dict(entry(i, lp), top_logprobs=[entry(j, lq) for j, lq in top])
                        for i, lp, top in zip(tokens, logprobs, tops)], "refusal": None}

  def _completion_logprobs(self, tokens, logprobs, tops, offsets) -> dict:
    return {"tokens": [self.token_str(i) for i in tokens], "token_logprobs": list(logprobs),
            "top_logprobs": [self._top_dict(t) for t in tops], "text_offset": list(offsets)}

  def _prompt_part(self, index: int, c: Choice):
    """(text, logprobs dict parts) of the echoed prompt of choice `index`."""
    text, offsets = self.echo_texts[index // self.req.n]
    ids = self.req.prompts[index // self.req.n]
    if self.req.logprobs is None:
      return text, None
    lps = c.prompt_logprobs or [None] * len(ids)
    tops = c.prompt_tops or [None] * len(ids)
    return text, (ids, lps, tops, offsets)

  # -- whole responses --
  def full(self, choices: list[Choice], prompt_tokens: int) -> dict:
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

  def chunk(self, index: int, ev: dict, c: Choice) -> dict | None:
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


class LoopSink:
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


async def collect(engine: Engine, seqs, queue: asyncio.Queue, choices: list[Choice],
                  is_disconnected: Callable) -> bool:
  """Applies the events of `seqs` (from `queue`) to their choices until every one is over. False
  when the client went away first; sequences still running are then cancelled (their slots freed)."""
  remaining = len(seqs)
  try:
    while remaining:
      try:
        index, ev = await asyncio.wait_for(queue.get(), 0.5)
      except asyncio.TimeoutError:
        if await is_disconnected():
          return False
        continue
      remaining -= choices[index].apply(ev)
  finally:
    if remaining:
      engine.cancel(seqs)
  return True


async def stream(engine: Engine, seqs, queue: asyncio.Queue, choices: list[Choice], fmt: Formatter,
                 prompt_tokens: int):
  """The SSE body of a streamed response: the formatter's chunks as the events of `seqs` arrive, then
  the usage chunk (if asked) and [DONE]."""
  remaining = len(seqs)
  try:
    for chunk in fmt.opening(len(seqs)):
      yield sse(chunk)
    while remaining:
      index, ev = await queue.get()
      c = choices[index]
      done = c.apply(ev)
      remaining -= done
      if c.error:
        yield sse(ApiError(500, c.error, None, "server_error").body())
        return
      chunk = fmt.chunk(index, ev, c)
      if chunk is not None:
        yield sse(chunk)
    if fmt.req.include_usage:
      yield sse(fmt.usage_chunk(choices, prompt_tokens))
    yield DONE
  finally:
    if remaining:  # the client went away (or an error ended the stream): free the slots
      engine.cancel(seqs)
