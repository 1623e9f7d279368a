"""The one module that talks to the endpoint: the official `openai` client plus `tenacity`.

Any OpenAI-compatible server works (vLLM, llama.cpp, Ollama, SGLang, llm_jax's own). The
client's built-in retries are off (max_retries=0) so that one policy, stated here, applies:

  retried      timeouts, connection errors, 408, 429 and 5xx: exponential backoff with jitter
               (`backoff` * 2^attempt + U(0, backoff), at most `max_backoff`), or the server's
               Retry-After / retry-after-ms when it sends one (also capped at `max_backoff`)
  not retried  400 and 422 (this request is wrong: `RequestRejected`)
  fatal        401, 403, 404 (every request would fail the same way: `EndpointError`)

Counters (requests, retries and the seconds waited per reason, tokens) are kept under a lock;
requests run from several threads at once.
"""

from __future__ import annotations

import collections
import dataclasses
import email.utils
import threading
import time

from absl import logging
import openai
import tenacity


class RequestRejected(Exception):
  """The endpoint refused this request (400/422); retrying would not help."""


class RequestGaveUp(Exception):
  """A transient error persisted through every attempt; a later rerun may succeed."""


class EndpointError(Exception):
  """The endpoint cannot serve any request (bad key, unknown model, wrong URL)."""


@dataclasses.dataclass(frozen=True)
class EndpointConfig:
  base_url: str
  model: str
  api_key: str = ""
  timeout: float = 120.0  # seconds per request
  max_retries: int = 5  # retries after the first attempt (transient errors only)
  backoff: float = 1.0  # first retry waits about this long (doubling, plus jitter)
  max_backoff: float = 60.0  # no wait is longer, Retry-After included
  temperature: float = 0.7
  top_p: float = 0.95
  max_tokens: int = 2048
  seed: int | None = None  # sent to servers that support it (vLLM, llama.cpp)


@dataclasses.dataclass(frozen=True)
class Reply:
  text: str
  finish_reason: str | None
  prompt_tokens: int
  completion_tokens: int


def _retry_reason(e: BaseException) -> str | None:
  """Why `e` is worth another attempt ("timeout", "429", ...), or None when it is not."""
  if isinstance(e, openai.APITimeoutError):
    return "timeout"
  if isinstance(e, openai.APIConnectionError):
    return "connection"
  if isinstance(e, openai.APIStatusError):
    code = e.status_code
    if code == 429:
      return "429"
    if code == 408:
      return "timeout"
    if code >= 500:
      return "5xx"
  return None


def retry_after_seconds(e: BaseException) -> float | None:
  """The wait the server asked for (retry-after-ms, or Retry-After in seconds or as a date)."""
  response = getattr(e, "response", None)
  if response is None:
    return None
  headers = response.headers
  ms = headers.get("retry-after-ms")
  if ms:
    try:
      return max(0.0, float(ms) / 1000)
    except ValueError:
      pass
  value = headers.get("retry-after")
  if not value:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError):
    return None
  return max(0.0, when.timestamp() - time.time())


class Endpoint:
  """chat(prompt) -> Reply, with the retry policy above; thread-safe."""

  def __init__(self, cfg: EndpointConfig, sleep=time.sleep):
    self.cfg = cfg
    self._client = openai.OpenAI(base_url=cfg.base_url, api_key=cfg.api_key or "not-needed",
                                 timeout=cfg.timeout, max_retries=0)
    self._sleep = sleep
    self._lock = threading.Lock()
    self.requests = collections.Counter()  # kind -> requests sent (attempts included)
    self.retries = collections.Counter()  # reason -> retries
    self.waited = collections.Counter()  # reason -> seconds slept before retrying
    self.tokens = collections.Counter()  # prompt / completion
    self._wait_exp = tenacity.wait_exponential_jitter(multiplier=cfg.backoff, max=cfg.max_backoff,
                                                      jitter=cfg.backoff)

  def check_model(self) -> None:
    """Fails early, with one line, when the server is unreachable or does not serve the model.
    Servers without a model list (404/405 on /models) are let through."""
    try:
      served = [m.id for m in self._client.models.list(timeout=min(self.cfg.timeout, 30))]
    except openai.APIConnectionError as e:
      raise EndpointError(f"cannot reach {self.cfg.base_url} ({type(e).__name__}: {e}); is the "
                          "server running, and does --base_url end with /v1?") from None
    except openai.AuthenticationError:
      raise EndpointError(f"{self.cfg.base_url} refused the API key (401); set the key's "
                          "environment variable named by --api_key_env.") from None
    except openai.APIStatusError:
      return
    if not served or self.cfg.model in served:
      return
    if len(served) == 1:  # llama.cpp lists its one model under the file name and serves any name
      logging.warning("synth: %s lists only the model %r, not --model=%r; going on (a server "
                      "that needs the exact name will answer 404).", self.cfg.base_url, served[0],
                      self.cfg.model)
      return
    raise EndpointError(f"--model={self.cfg.model!r} is not served at {self.cfg.base_url}; "
                        f"it serves {served[:10]}.")

  def _wait(self, state: tenacity.RetryCallState) -> float:
    e = state.outcome.exception()
    asked = retry_after_seconds(e)
    return min(asked, self.cfg.max_backoff) if asked is not None else self._wait_exp(state)

  def _before_sleep(self, state: tenacity.RetryCallState) -> None:
    reason = _retry_reason(state.outcome.exception())
    with self._lock:
      self.retries[reason] += 1
      self.waited[reason] += state.next_action.sleep

  def _once(self, kind: str, prompt: str) -> Reply:
    with self._lock:
      self.requests[kind] += 1
    kwargs = {}
    if self.cfg.seed is not None:
      kwargs["seed"] = self.cfg.seed
    response = self._client.chat.completions.create(
        model=self.cfg.model, messages=[{"role": "user", "content": prompt}],
        temperature=self.cfg.temperature, top_p=self.cfg.top_p,
        max_tokens=self.cfg.max_tokens, **kwargs)
    choice = response.choices[0] if response.choices else None
    usage = response.usage
    reply = Reply(text=(choice.message.content if choice else "") or "",
                  finish_reason=choice.finish_reason if choice else None,
                  prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                  completion_tokens=getattr(usage, "completion_tokens", 0) or 0)
    with self._lock:
      self.tokens["prompt"] += reply.prompt_tokens
      self.tokens["completion"] += reply.completion_tokens
    return reply

  def chat(self, kind: str, prompt: str) -> Reply:
    """One completion of a single-turn user prompt; `kind` (qa, judge, paraphrase) only
    labels the request counters."""
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(self.cfg.max_retries + 1),
        wait=self._wait,
        retry=tenacity.retry_if_exception(lambda e: _retry_reason(e) is not None),
        before_sleep=self._before_sleep, sleep=self._sleep, reraise=True)
    try:
      return retrying(self._once, kind, prompt)
    except openai.APIStatusError as e:
      code = e.status_code
      if code in (401, 403):
        raise EndpointError(f"{self.cfg.base_url} answered {code} ({_message(e)}); check the API "
                            "key (--api_key_env).") from None
      if code == 404:
        raise EndpointError(f"{self.cfg.base_url} answered 404 ({_message(e)}); check --base_url "
                            "(it usually ends with /v1) and --model.") from None
      if _retry_reason(e) is None:
        raise RequestRejected(f"{code}: {_message(e)}") from None
      raise RequestGaveUp(f"{code} after {self.cfg.max_retries + 1} attempts: "
                          f"{_message(e)}") from None
    except openai.APIConnectionError as e:
      raise RequestGaveUp(f"{_retry_reason(e)} after {self.cfg.max_retries + 1} attempts") from None


def _message(e: openai.APIStatusError) -> str:
  body = e.body
  if isinstance(body, dict):
    inner = body.get("error", body)
    if isinstance(inner, dict) and inner.get("message"):
      return str(inner["message"])[:200]
  return str(e.message)[:200]
