"""A scripted OpenAI-compatible server for the synth tests (stdlib only, 127.0.0.1, a thread).

Each chat request is keyed by the first `DOC<digits>` marker in its <document> (or in its
<questions>, for rephrasings) plus its kind: "DOC03" (QA), "DOC03/judge", "DOC03/paraphrase".
A script maps keys to steps, replayed in order per key (the last step repeats):

  {"content": "..."}                         a 200 reply with this message content
  {"status": 429, "headers": {...}}          an error reply (OpenAI-style JSON body)
  {"sleep": 2.0, ...}                        wait first (a client timeout), then the rest
  {"auto": True}                             the built-in answer below

Without a script entry the server answers by itself, deterministically and grounded: QA pairs
whose answers are sentences of the document, rephrasings that prefix the question, judge
scores of 8. The server counts requests per key, so tests can check where retries happened.
"""

from __future__ import annotations

import collections
import http.server
import json
import re
import threading
import time

MODEL = "stub-model"
_MARKER = re.compile(r"DOC\d+")
# The block itself: the tag alone on its line (templates also mention tags in their prose).
_TAGGED = {tag: re.compile(rf"^<{tag}>\n(.*?)\n</{tag}>$", re.S | re.M)
           for tag in ("document", "questions", "pairs")}
_SENTENCE = re.compile(r"[^。！？.!?]+[。！？.!?]")


def prompt_parts(prompt: str) -> tuple[str, str, str]:
  """(kind, marker, document text) of a prompt written from the default templates."""
  kind = ("judge" if _TAGGED["pairs"].search(prompt) else
          "paraphrase" if _TAGGED["questions"].search(prompt) else "qa")
  tag = "questions" if kind == "paraphrase" else "document"
  found = _TAGGED[tag].search(prompt)
  text = found.group(1) if found else prompt
  marker = _MARKER.search(text)
  return kind, marker.group(0) if marker else "", text


def auto_pairs(document: str, n: int = 3) -> list[dict]:
  """Up to n grounded pairs: the answer is a sentence of the document, the question quotes
  its opening words."""
  pairs = []
  for s in _SENTENCE.findall(document):
    s = s.strip()
    if len(s) < 8:
      continue
    if re.search(r"[\u4e00-\u9fff]", s):
      question = f"文中以“{s[:10]}”开头的那句话是怎么说的？"
    else:
      question = f"What does the sentence beginning '{' '.join(s.split()[:6])}' say?"
    pairs.append({"question": question, "answer": s})
    if len(pairs) == n:
      break
  return pairs


def auto_reply(kind: str, prompt: str, document: str) -> str:
  if kind == "judge":
    pairs = json.loads(_TAGGED["pairs"].search(prompt).group(1))
    return json.dumps([8] * len(pairs))
  if kind == "paraphrase":
    questions = json.loads(document)
    return json.dumps([[f"请问：{q}", f"{q}（简要回答）", f"Q: {q}"] for q in questions],
                      ensure_ascii=False)
  return json.dumps(auto_pairs(document), ensure_ascii=False)


class StubServer:
  """Start with `with StubServer(script) as server:`; `server.base_url` ends in /v1."""

  def __init__(self, script: dict | None = None, delay: float = 0.0, models=(MODEL,)):
    self.script = {k: list(v) for k, v in (script or {}).items()}
    self.delay = delay  # seconds added to every chat reply
    self.models = list(models)
    self.counts: collections.Counter = collections.Counter()  # key -> requests
    self.bodies: list[dict] = []
    self._lock = threading.Lock()
    self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
    self._httpd.daemon_threads = True
    self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
    self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

  def __enter__(self) -> "StubServer":
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._httpd.shutdown()
    self._httpd.server_close()

  def _step(self, key: str) -> dict:
    with self._lock:
      n = self.counts[key]
      self.counts[key] += 1
      steps = self.script.get(key)
    if not steps:
      return {"auto": True}
    return steps[min(n, len(steps) - 1)]

  def _handler(self):
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):  # quiet test output
        pass

      def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        try:
          self.send_response(status)
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(data)))
          for k, v in (headers or {}).items():
            self.send_header(k, v)
          self.end_headers()
          self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
          pass  # the client timed out and left

      def do_GET(self):  # pylint: disable=invalid-name
        if self.path.rstrip("/").endswith("/models"):
          self._send(200, {"object": "list", "data": [
              {"id": m, "object": "model", "created": 0, "owned_by": "stub"} for m in server.models]})
        else:
          self._send(404, {"error": {"message": f"no route {self.path}"}})

      def do_POST(self):  # pylint: disable=invalid-name
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        with server._lock:
          server.bodies.append(body)
        prompt = body["messages"][-1]["content"]
        kind, marker, document = prompt_parts(prompt)
        step = server._step(marker if kind == "qa" else f"{marker}/{kind}")
        time.sleep(server.delay + step.get("sleep", 0.0))
        if "status" in step:
          self._send(step["status"], step.get("body", {"error": {
              "message": f"scripted {step['status']}", "type": "stub"}}), step.get("headers"))
          return
        content = (step["content"] if "content" in step else
                   auto_reply(kind, prompt, document))
        self._send(200, {
            "id": "chatcmpl-stub", "object": "chat.completion", "created": 0,
            "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": step.get("finish_reason", "stop"),
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(content),
                      "total_tokens": len(prompt) + len(content)}})

    return Handler
