"""OpenAI request fields: validation with errors that name the field, and the parsed request.

Every user error is an `ApiError` whose body has OpenAI's shape:
  {"error": {"message": ..., "type": "invalid_request_error", "param": "<field>", "code": ...}}
Fields the server does not implement (tools, logit_bias, suffix, json output) are refused by name
rather than silently ignored; unknown extra fields are ignored, as OpenAI's SDKs may send them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets

from llm_jax.infer import session as session_lib
from llm_jax.infer.sampling import SamplingConfig
from llm_jax.serve import tokens as tokens_lib

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts in one /v1/completions batch
MAX_CHOICES = 64  # prompts x n in one request (the server's default; --max_choices)
MAX_STOPS = 16
MAX_STOP_CHARS = 256  # characters in one stop string
MAX_TOP_LOGPROBS = 20
MAX_JSON_DEPTH = 64  # nesting of objects and arrays in a request body
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy default


class ApiError(Exception):
  """An error answered in OpenAI's shape; `headers` go with it (Retry-After, Connection: close)."""

  def __init__(self, status: int, message: str, param: str | None = None,
               type_: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
    self.headers = headers

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def show(v) -> str:
  """A JSON value as error messages quote it (cut to 60 characters)."""
  s = json.dumps(v, ensure_ascii=False)
  return s if len(s) <= 60 else s[:57] + "..."


def too_deep(value, limit: int = MAX_JSON_DEPTH) -> bool:
  """Whether a parsed JSON value nests objects and arrays more than `limit` levels (no recursion)."""
  stack = [(value, 1)]
  while stack:
    v, depth = stack.pop()
    if not isinstance(v, (dict, list)):
      continue
    if depth > limit:
      return True
    children = v.values() if isinstance(v, dict) else v
    stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
  return False


def parse_body(body: bytes) -> dict:
  """A request body as a JSON object, or the 400 that says why not (not JSON, not an object, nested
  deeper than MAX_JSON_DEPTH, a lone surrogate in a string)."""
  deep = ApiError(400, f"the request body nests objects and arrays more than {MAX_JSON_DEPTH} levels deep",
                  None, code="too_deep")
  try:
    data = json.loads(body)
  except (ValueError, UnicodeDecodeError) as e:
    raise ApiError(400, f"the request body is not valid JSON ({e})", None) from None
  except RecursionError:  # nested beyond the parser's own limit
    raise deep from None
  if too_deep(data):
    raise deep
  if not isinstance(data, dict):
    raise ApiError(400, "the request body must be a JSON object", None)
  bad = invalid_text(data)
  if bad is not None:
    raise ApiError(400, f"'{bad}' holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text", bad)
  return data


def invalid_text(value, path: str = "") -> str | None:
  """The path of the first string in a JSON value that is not valid Unicode (a lone surrogate, which
  JSON's \\u escapes can spell but no tokenizer can encode), or None."""
  if isinstance(value, str):
    try:
      value.encode("utf-8")
    except UnicodeEncodeError:
      return path or "body"
    return None
  if isinstance(value, dict):
    items = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    bad_key = next((k for k in value if invalid_text(k) is not None), None)
    if bad_key is not None:
      return path or "body"
  elif isinstance(value, list):
    items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
  else:
    return None
  for p, v in items:
    bad = invalid_text(v, p)
    if bad is not None:
      return bad
  return None


def number(body: dict, name: str, default, *, lo=None, hi=None, lo_open=False, integer=False):
  """body[name] as a number within [lo, hi] (lo excluded if lo_open); default when absent/null."""
  v = body.get(name)
  if v is None:
    return default
  kind = "an integer" if integer else "a number"
  if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
    raise ApiError(400, f"'{name}' must be {kind}, got {show(v)}", name)
  if not math.isfinite(v):
    raise ApiError(400, f"'{name}' must be finite, got {v}", name)
  if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
    lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
    hi_s = "" if hi is None else f"<= {hi}"
    raise ApiError(400, f"'{name}'={v} is out of range: it must be {' and '.join(x for x in (lo_s, hi_s) if x)}",
                   name)
  return v


def boolean(body: dict, name: str, default: bool) -> bool:
  v = body.get(name)
  if v is None:
    return default
  if not isinstance(v, bool):
    raise ApiError(400, f"'{name}' must be true or false, got {show(v)}", name)
  return v


def unsupported(body: dict, *names: str) -> None:
  for name in names:
    v = body.get(name)
    if v not in (None, {}, [], "", False):
      raise ApiError(400, f"'{name}' is not supported by this server", name, code="unsupported_parameter")


def stop_strings(body: dict) -> tuple[str, ...]:
  v = body.get("stop")
  if v is None:
    return ()
  items = [v] if isinstance(v, str) else v
  if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
    raise ApiError(400, f"'stop' must be a string or a list of strings, got {show(v)}", "stop")
  if len(items) > MAX_STOPS:
    raise ApiError(400, f"'stop' has {len(items)} strings; at most {MAX_STOPS} are allowed", "stop")
  if any(not x for x in items):
    raise ApiError(400, "'stop' strings must not be empty", "stop")
  longest = max(items, key=len, default="")
  if len(longest) > MAX_STOP_CHARS:
    raise ApiError(400, f"'stop' holds a string of {len(longest)} characters; at most {MAX_STOP_CHARS} are allowed",
                   "stop")
  return tuple(items)


def sampling(body: dict, max_tokens: int) -> SamplingConfig:
  """The sampling fields; `seed` absent means a fresh random seed (different each request)."""
  seed = number(body, "seed", None, integer=True)
  top_k = number(body, "top_k", 0, lo=-1, hi=1 << 30, integer=True)
  return SamplingConfig(
      temperature=float(number(body, "temperature", 1.0, lo=0, hi=100)),
      top_k=0 if top_k == -1 else top_k,  # vLLM's -1 = off
      top_p=float(number(body, "top_p", 1.0, lo=0, hi=1, lo_open=True)),
      min_p=_min_p(body),
      repetition_penalty=float(number(body, "repetition_penalty", 1.0, lo=0, hi=100, lo_open=True)),
      presence_penalty=float(number(body, "presence_penalty", 0.0, lo=-2, hi=2)),
      frequency_penalty=float(number(body, "frequency_penalty", 0.0, lo=-2, hi=2)),
      max_new_tokens=max_tokens,
      seed=secrets.randbits(31) if seed is None else seed & 0x7FFFFFFF)


def _min_p(body: dict) -> float:
  v = float(number(body, "min_p", 0.0, lo=0, hi=1))
  if v >= 1:
    raise ApiError(400, f"'min_p'={v} is out of range: it must be >= 0 and < 1", "min_p")
  return v


@dataclasses.dataclass
class GenRequest:
  """A parsed /v1/chat/completions or /v1/completions request."""
  kind: str  # "chat" | "completion"
  model: str
  prompts: list[list[int]]  # token ids, one per prompt (chat: exactly one)
  n: int
  sampling: SamplingConfig  # the first choice's; choice i uses seed + i
  stop: tuple[str, ...]
  stream: bool
  include_usage: bool
  logprobs: int | None  # None: off; else how many top alternatives per token
  echo: bool
  ignore_eos: bool

  def choice_sampling(self, i: int) -> SamplingConfig:
    return dataclasses.replace(self.sampling, seed=(self.sampling.seed + i) & 0x7FFFFFFF)


def _common(body: dict) -> tuple[int, tuple, bool, bool, bool]:
  unsupported(body, "tools", "tool_choice", "functions", "function_call", "logit_bias", "suffix",
              "audio", "modalities", "prediction")
  fmt = body.get("response_format")
  if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
    raise ApiError(400, "only response_format {\"type\": \"text\"} is supported", "response_format",
                   code="unsupported_parameter")
  n = number(body, "n", 1, lo=1, hi=MAX_N, integer=True)
  best_of = number(body, "best_of", None, lo=1, integer=True)
  if best_of is not None and best_of != n:
    raise ApiError(400, "'best_of' other than n is not supported", "best_of", code="unsupported_parameter")
  stream = boolean(body, "stream", False)
  opts = body.get("stream_options")
  if opts is not None and not isinstance(opts, dict):
    raise ApiError(400, f"'stream_options' must be an object, got {show(opts)}", "stream_options")
  try:
    include_usage = boolean(opts or {}, "include_usage", False)
  except ApiError as e:
    raise ApiError(400, e.message, "stream_options.include_usage") from None
  if opts and not stream:
    raise ApiError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options")
  return n, stop_strings(body), stream, include_usage, boolean(body, "ignore_eos", False)


def _check_context(prompt_len: int, max_tokens: int, context: int, param: str) -> None:
  if prompt_len + max_tokens > context:
    raise ApiError(400, f"This model's maximum context length is {context} tokens, but the prompt has "
                        f"{prompt_len} tokens and max_tokens is {max_tokens} ({prompt_len + max_tokens} in "
                        "all). Shorten the prompt or lower max_tokens.", param, code="context_length_exceeded")


def messages_of(body: dict) -> list[dict]:
  """`messages` normalised to [{role, content: str}] (text parts joined; developer = system)."""
  msgs = body.get("messages")
  if not isinstance(msgs, list) or not msgs:
    raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
  out = []
  for k, m in enumerate(msgs):
    where = f"messages[{k}]"
    if not isinstance(m, dict):
      raise ApiError(400, f"'{where}' must be an object with 'role' and 'content'", where)
    role = m.get("role")
    if role == "developer":
      role = "system"
    if role not in ("system", "user", "assistant"):
      raise ApiError(400, f"'{where}.role'={show(role)} is not supported; use system, user or assistant",
                     f"{where}.role")
    if role == "system" and k:
      raise ApiError(400, f"'{where}': a system message may only open the conversation", f"{where}.role")
    content = m.get("content")
    if content is None and role == "assistant":
      content = ""
    if isinstance(content, list):
      parts = []
      for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
          raise ApiError(400, f"'{where}.content[{j}]' must be a text part {{\"type\": \"text\", \"text\": ...}}; "
                              "this model reads text only", f"{where}.content")
        parts.append(part["text"])
      content = "".join(parts)
    if not isinstance(content, str):
      raise ApiError(400, f"'{where}.content' must be a string, got {show(content)}", f"{where}.content")
    out.append({"role": role, "content": content})
  return out


def _check_choices(n_prompts: int, n: int, max_choices: int) -> None:
  if n_prompts * n > max_choices:
    raise ApiError(400, f"{n_prompts} prompt(s) x n={n} asks for {n_prompts * n} choices; this server takes at most "
                        f"{max_choices} per request (split it into several requests)", "n" if n > 1 else "prompt",
                   code="too_many_choices")


def check_prompt_bytes(nbytes: int, max_prompt_bytes: int, param: str, what: str) -> None:
  """400 naming `param` when a prompt's text (`nbytes` bytes) is over the bound (0: none)."""
  if max_prompt_bytes and nbytes > max_prompt_bytes:
    raise ApiError(400, f"{what} {nbytes} bytes of text; this server takes at most {max_prompt_bytes} bytes per "
                        "prompt (checked before tokenizing: far more than the model's context holds)", param,
                   code="prompt_too_long")


def parse_chat(body: dict, model: str, tok, context: int, *, max_prompt_bytes: int = 0,
               max_choices: int = MAX_CHOICES) -> GenRequest:
  """The request; `max_prompt_bytes` (0: no bound) bounds the messages' text before it is tokenized."""
  n, stops, stream, include_usage, ignore_eos = _common(body)
  _check_choices(1, n, max_choices)
  messages = messages_of(body)
  check_prompt_bytes(sum(len(m["content"].encode("utf-8")) for m in messages), max_prompt_bytes, "messages",
               "'messages' hold")
  want_logprobs = boolean(body, "logprobs", False)
  top = number(body, "top_logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS, integer=True)
  if top is not None and not want_logprobs:
    raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
  ids = session_lib.prompt_ids(tok, messages)
  name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
  max_tokens = number(body, name, None, lo=1, integer=True)
  if max_tokens is None:
    max_tokens = max(context - len(ids), 1)  # as long as the context allows
  _check_context(len(ids), max_tokens, context, name if body.get(name) is not None else "messages")
  return GenRequest("chat", model, [ids], n, sampling(body, max_tokens), stops, stream, include_usage,
                    (top or 0) if want_logprobs else None, False, ignore_eos)


def prompts_of(body: dict, tok, vocab_size: int, *, n: int = 1, max_prompt_bytes: int = 0,
               max_choices: int = MAX_CHOICES) -> list[list[int]]:
  """`prompt` as token ids: a string, a list of strings, a list of ids or a list of id lists. The
  bounds (prompts x n, each string's bytes) are checked before anything is tokenized."""
  p = body.get("prompt")
  bad = ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                      f"lists of token ids, got {show(p)}", "prompt")
  if isinstance(p, str):
    items = [p]
  elif isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
    items = [p]
  elif isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
    items = p
  else:
    raise bad
  if len(items) > MAX_PROMPTS:
    raise ApiError(400, f"'prompt' holds {len(items)} prompts; at most {MAX_PROMPTS} per request", "prompt")
  _check_choices(len(items), n, max_choices)
  for k, item in enumerate(items):
    if isinstance(item, str):
      check_prompt_bytes(len(item.encode("utf-8")), max_prompt_bytes, "prompt", f"'prompt' item {k} holds")
  out = []
  for k, item in enumerate(items):
    if isinstance(item, str):
      ids = tokens_lib.encode_raw(tok, item)
    else:
      if not all(isinstance(x, int) and not isinstance(x, bool) for x in item):
        raise bad
      bad_ids = [x for x in item if not 0 <= x < vocab_size]
      if bad_ids:
        raise ApiError(400, f"'prompt' item {k} holds {bad_ids[0]}, which is not a token id of this model "
                            f"(vocabulary of {vocab_size})", "prompt")
      ids = list(item)
    if not ids:
      raise ApiError(400, f"'prompt' item {k} is empty; a completion needs at least one prompt token", "prompt")
    out.append(ids)
  return out


def parse_completion(body: dict, model: str, tok, context: int, vocab_size: int, *, max_prompt_bytes: int = 0,
                     max_choices: int = MAX_CHOICES) -> GenRequest:
  n, stops, stream, include_usage, ignore_eos = _common(body)
  prompts = prompts_of(body, tok, vocab_size, n=n, max_prompt_bytes=max_prompt_bytes, max_choices=max_choices)
  echo = boolean(body, "echo", False)
  logprobs = body.get("logprobs")
  if isinstance(logprobs, bool):  # some clients send the chat form
    logprobs = 0 if logprobs else None
  else:
    logprobs = number(body, "logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS, integer=True)
  max_tokens = number(body, "max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS, lo=0, integer=True)
  if max_tokens == 0 and not echo:
    raise ApiError(400, "'max_tokens'=0 generates nothing; it is only useful with 'echo': true", "max_tokens")
  for ids in prompts:
    _check_context(len(ids), max_tokens, context, "max_tokens" if body.get("max_tokens") is not None else "prompt")
  return GenRequest("completion", model, prompts, n, sampling(body, max_tokens), stops, stream,
                    include_usage, logprobs, echo, ignore_eos)
