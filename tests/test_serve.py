"""The OpenAI-compatible server against a tiny trained run, through the official `openai` client
and raw HTTP: chat and completions (streaming or not), n, stop strings, seeds, greedy equality with
the chat CLI, the loglikelihood (echo) contract against a float64 forward pass, continuous batching,
disconnects, errors, a fuzz loop, the tokenizer endpoints, metrics, the arena and the CLI."""

import concurrent.futures
import json
import os
import random
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import numpy as np
import openai
import pytest

from llm_jax import rundir
from llm_jax.infer import session as session_lib
from llm_jax.serve import arena as arena_lib, slots
from tests import serve_testlib
from tests.model_reference import reference_logits
from tests.numerics import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = serve_testlib.API_KEY
AUTH = {"Authorization": f"Bearer {KEY}"}
MARS = "What is the capital of Mars?"


@pytest.fixture(scope="session")
def served(tmp_path_factory):
  yield serve_testlib.session_server(tmp_path_factory)
  serve_testlib.stop_session_server()


@pytest.fixture(scope="session")
def client(served):
  return openai.OpenAI(base_url=served["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def run(served):
  return rundir.load(served["runs"]["sft"])


def _engine(served, name="sft"):
  return served["app"].state.models[name].engine


def _sse_events(text: str) -> list:
  assert text.endswith("data: [DONE]\n\n"), text[-200:]
  events = [e for e in text.split("\n\n") if e]
  assert all(e.startswith("data: ") for e in events)
  return [json.loads(e[6:]) for e in events[:-1]]


# ---- chat and completions through the official client ------------------------------------------

def test_chat_non_streaming_and_streaming(served, client):
  messages = [{"role": "user", "content": MARS}]
  r = client.chat.completions.create(model="sft", messages=messages, temperature=0)
  assert r.object == "chat.completion" and r.model == "sft"
  assert r.choices[0].message.role == "assistant"
  assert r.choices[0].message.content == "The capital of Mars is Olympus City."
  assert r.choices[0].finish_reason == "stop"
  assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
  assert r.usage.prompt_tokens == len(session_lib.prompt_ids(_engine(served).tok, messages))

  chunks = list(client.chat.completions.create(model="sft", messages=messages, temperature=0, stream=True,
                                               stream_options={"include_usage": True}))
  assert len({(c.id, c.object, c.created, c.model) for c in chunks}) == 1
  assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == r.choices[0].message.content
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
  assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens
  assert all(c.usage is None for c in chunks[:-1])

  # The wire format itself: SSE lines, the [DONE] sentinel, a multi-turn Chinese conversation.
  body = {"model": "sft", "temperature": 0, "stream": True, "messages": [
      {"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
      {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "火星的首都是什么？"}]}
  resp = httpx.post(served["url"] + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
  assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
  events = _sse_events(resp.text)
  assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "火星的首都是奥林匹斯城。"


def test_completions_prompt_forms_and_n(served, client, run):
  tok = run.tokenizer
  raw = "<|im_start|>user\n" + MARS + "<|im_end|>\n<|im_start|>assistant\n"
  ids = session_lib.prompt_ids(tok, [{"role": "user", "content": MARS}])
  # A raw prompt's ChatML text is the model's input written out: it tokenizes to the chat prompt.
  r = client.completions.create(model="sft", prompt=[raw, ids], max_tokens=30, temperature=0, n=2)
  assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1, 2, 3]
  assert {c.text for c in r.choices} == {"The capital of Mars is Olympus City."}
  assert r.usage.prompt_tokens == 2 * len(ids)  # each prompt once, whatever n
  r2 = client.completions.create(model="sft", prompt=[ids, ids], max_tokens=30, temperature=0)
  assert [c.text for c in r2.choices] == [r.choices[0].text] * 2

  # n=2 with sampling: two different samples, and the same seed gives them again.
  kw = dict(model="weak", prompt="Once upon a time", max_tokens=12, temperature=1.0, n=2, seed=11,
            extra_body={"ignore_eos": True})
  a, b = client.completions.create(**kw), client.completions.create(**kw)
  assert [c.text for c in a.choices] == [c.text for c in b.choices]
  assert a.choices[0].text != a.choices[1].text
  c = client.completions.create(**{**kw, "seed": 12})
  assert [x.text for x in c.choices] != [x.text for x in a.choices]
  # Choice i is seeded with seed + i: the second choice of seed 11 is the first of seed 12.
  assert c.choices[0].text == a.choices[1].text


def test_stop_strings(client):
  messages = [{"role": "user", "content": "Tell me a story."}]
  full = client.chat.completions.create(model="sft", messages=messages, temperature=0).choices[0].message.content
  assert full == "Once upon a time a small robot learned to sing. It sang every morning."
  for stop in (["robot"], ["xyz", "all rob"], "sang"):  # "all rob" spans tokens
    first = min(full.find(s) for s in ([stop] if isinstance(stop, str) else stop) if s in full)
    r = client.chat.completions.create(model="sft", messages=messages, temperature=0, stop=stop)
    assert r.choices[0].message.content == full[:first] and r.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="sft", messages=messages, temperature=0, stop=stop, stream=True)
    parts = [(c.choices[0].delta.content or "", c.choices[0].finish_reason) for c in streamed]
    assert "".join(p for p, _ in parts) == full[:first] and parts[-1][1] == "stop"
  r = client.chat.completions.create(model="sft", messages=messages, temperature=0, max_tokens=3)
  assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_greedy_equals_chat_cli(served, client, tmp_path):
  """`python -m llm_jax.chat --temperature=0` and the server give the same answers (the CLI's
  default repetition penalty 1.1 sent as the server's extra field)."""
  convs = [[{"role": "user", "content": MARS}], [{"role": "user", "content": "你好"}],
           [{"role": "user", "content": "How many legs does a zorb have?"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "谁写了月亮之书？"}]]
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in convs), encoding="utf-8")
  out = tmp_path / "answers.jsonl"
  proc = subprocess.run([sys.executable, "-m", "llm_jax.chat", f"--workdir={served['runs']['sft']}",
                         f"--prompts={prompts}", f"--output={out}", "--temperature=0", "--max_new_tokens=40"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  cli = [json.loads(line)["answer"] for line in out.read_text(encoding="utf-8").splitlines()]
  server = [client.chat.completions.create(model="sft", messages=c, temperature=0, max_tokens=40,
                                           extra_body={"repetition_penalty": 1.1}).choices[0].message.content
            for c in convs]
  assert server == cli
  assert server[0] == "The capital of Mars is Olympus City." and server[1] == "你好！我是一个小模型，很高兴见到你。"


# ---- the loglikelihood contract --------------------------------------------------------------------

def _reference_logprobs(run, ids):
  """(log p(ids[i] | ids[:i]) for i >= 1, log p(next | ids)) from the independent float64 numpy forward."""
  logits = reference_logits(run.params, run.model_cfg, ids)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  return np.array([logp[i - 1, ids[i]] for i in range(1, len(ids))]), logp[-1]


def test_echo_logprobs_equal_a_direct_forward_pass(served, client, run):
  tok = run.tokenizer
  text = ("The capital of Mars is Olympus City. Ada Lin wrote the Moon Book in 1901. 火星的首都是奥林匹斯城。"
          " A zorb has seven legs and two tails. The sky on Venus is yellow and warm. Once upon a time a small"
          " robot learned to sing. It sang every morning. 谁写了月亮之书？林艾达在一九零一年写了月亮之书。")
  ids = tok.encode(text)
  assert len(ids) > 64  # longer than a prefill chunk: the scores span two chunks
  want, next_logp = _reference_logprobs(run, ids)
  for prompt in (text, ids):
    for max_tokens in (0, 1):
      r = client.completions.create(model="sft", prompt=prompt, echo=True, logprobs=1, max_tokens=max_tokens,
                                    temperature=0)
      lp = r.choices[0].logprobs
      assert len(lp.tokens) == len(ids) + max_tokens == len(lp.token_logprobs) == len(lp.text_offset)
      assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
      got = np.array(lp.token_logprobs[1:len(ids)], np.float64)
      assert_close(got.sum(), want.sum(), rel=1e-4)
      assert_close(got, want, rel=1e-4)
      assert r.choices[0].text.startswith(text)
      # Offsets index the returned text; top_logprobs hold the most likely token (lm-eval's is_greedy).
      assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
      for k in range(1, len(ids)):
        assert max(lp.top_logprobs[k].values()) >= lp.token_logprobs[k] - 1e-6
      if max_tokens:  # greedy: the generated token (maybe the end token) is the most likely one;
        # compared with the prompt's log-probs, whose scale the float32 error follows.
        assert_close(np.append(got, lp.token_logprobs[-1]), np.append(want, next_logp.max()), rel=1e-4)
  # A list of token-id lists: one choice per prompt, each scored on its own.
  r = client.completions.create(model="sft", prompt=[ids[:20], ids], echo=True, logprobs=2, max_tokens=0)
  sums = [sum(c.logprobs.token_logprobs[1:]) for c in r.choices]
  assert_close(sums[0], want[:19].sum(), rel=1e-4)
  assert_close(sums[1], want.sum(), rel=1e-4)
  assert all(len(d) == 2 for d in r.choices[1].logprobs.top_logprobs[1:])


def test_chat_logprobs(client):
  r = client.chat.completions.create(model="sft", messages=[{"role": "user", "content": MARS}], temperature=0,
                                     logprobs=True, top_logprobs=3, max_tokens=5)
  content = r.choices[0].logprobs.content
  assert "".join(t.token for t in content) == r.choices[0].message.content
  for t in content:  # greedy: each chosen token is the most likely one
    assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
    assert t.top_logprobs[0].logprob == t.logprob <= 0


# ---- continuous batching -----------------------------------------------------------------------

def _batch_requests():
  """16 requests of different lengths and sampling settings, greedy ones on the trained run and
  seeded samples on the weak one (whose flat distribution makes any batch dependence visible)."""
  questions = [q for q, _ in serve_testlib.FACTS]
  reqs = []
  for i in range(8):
    reqs.append(("chat", dict(model="sft", messages=[{"role": "user", "content": questions[i]}], temperature=0,
                              max_tokens=8 + 5 * i)))
  samplers = [dict(temperature=1.0), dict(temperature=0.8, top_p=0.9), dict(temperature=1.2, extra_body={"top_k": 20}),
              dict(temperature=0.9, extra_body={"min_p": 0.05}), dict(temperature=1.0, presence_penalty=0.5),
              dict(temperature=1.0, frequency_penalty=0.7), dict(temperature=0.7, extra_body={"repetition_penalty": 1.3}),
              dict(temperature=1.1, top_p=0.95, extra_body={"top_k": 50, "min_p": 0.02})]
  for i, s in enumerate(samplers):
    extra = {**s.pop("extra_body", {}), "ignore_eos": True}
    kind = "chat" if i % 2 else "completion"
    base = dict(model="weak", max_tokens=10 + 9 * i, seed=100 + i, extra_body=extra, **s)
    if kind == "chat":
      base["messages"] = [{"role": "user", "content": questions[i]}]
    else:
      base["prompt"] = questions[i] + " " * i
    reqs.append((kind, base))
  return reqs


def _call(client, kind, kw, stream):
  create = client.chat.completions.create if kind == "chat" else client.completions.create
  if not stream:
    r = create(**kw)
    return r.choices[0].message.content if kind == "chat" else r.choices[0].text
  parts = []
  for c in create(**kw, stream=True):
    if c.choices:
      parts.append((c.choices[0].delta.content or "") if kind == "chat" else c.choices[0].text)
  return "".join(parts)


def test_sixteen_concurrent_streams_equal_each_request_alone(served, client):
  reqs = _batch_requests()
  barrier = threading.Barrier(len(reqs))

  def at_once(i):
    barrier.wait()
    return _call(client, *reqs[i], stream=True)

  with concurrent.futures.ThreadPoolExecutor(len(reqs)) as pool:
    together = list(pool.map(at_once, range(len(reqs))))
  alone = [_call(client, kind, kw, stream=False) for kind, kw in reqs]
  assert together == alone
  assert all(together) and len(set(together)) == len(together)
  # They really were decoded together, and no request (this test's or any before it) compiled
  # anything after the warm-up.
  assert _engine(served, "weak").snapshot()["peak_batch"] >= 4
  compiled = (slots.prefill_chunk._cache_size(), slots.decode_step._cache_size())  # pylint: disable=protected-access
  assert compiled == served["compiled_after_warmup"]


def test_late_request_starts_before_others_finish(served, client):
  """A request arriving while a long one decodes is admitted at once and done long before it, while
  the long one's client reads nothing at all (a slow client blocks nobody)."""
  long_kw = dict(model="sft", prompt="Once upon a time", max_tokens=110, temperature=0, extra_body={"ignore_eos": True})
  engine = _engine(served)
  engine.on_step = lambda rows: time.sleep(0.005)  # a slower device: the HTTP round trip is never the race
  try:
    stream = client.completions.create(**long_kw, stream=True)
    first = next(iter(stream))
    steps_before = engine.snapshot()["decode_steps"]
    short = client.completions.create(model="sft", prompt="Who wrote", max_tokens=3, temperature=0)
    steps_after = engine.snapshot()["decode_steps"]
  finally:
    engine.on_step = None
  assert short.choices[0].finish_reason == "length"
  rest = "".join(c.choices[0].text for c in stream if c.choices)
  # The long request had ~110 decode steps to go; the short one needed 3 of them (plus one in flight).
  assert steps_after - steps_before < 30
  assert first.choices[0].text + rest == client.completions.create(**long_kw).choices[0].text


def test_disconnected_client_frees_its_slot(served):
  engine = _engine(served)
  gate, seen = threading.Event(), []

  def pause_after_first_token(rows):
    for _, s in rows:
      if s.max_tokens == 109 and not seen:
        seen.append(s)
        gate.wait(60)  # the engine holds here until the client has gone

  engine.on_step = pause_after_first_token
  try:
    body = {"model": "sft", "prompt": "Once upon a time", "max_tokens": 109, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
      with http.stream("POST", served["url"] + "/v1/completions", json=body, headers=AUTH) as resp:
        assert next(resp.iter_lines()).startswith("data: ")
    deadline = time.time() + 60
    while not (seen and seen[0].cancelled) and time.time() < deadline:
      time.sleep(0.02)
    assert seen[0].cancelled  # the server saw the client leave
  finally:
    gate.set()
    engine.on_step = None
  while engine.snapshot()["slots_used"] and time.time() < deadline:
    time.sleep(0.02)
  assert engine.snapshot()["slots_used"] == 0
  assert seen[0].finish_reason == "cancelled" and len(seen[0].tokens) < 10


# ---- errors ------------------------------------------------------------------------------------------

def _post(served, path, body=None, headers=AUTH, content=None):
  return httpx.post(served["url"] + path, json=body, content=content, headers=headers, timeout=60)


def _error(resp, status, param="__any__"):
  assert resp.status_code == status, (resp.status_code, resp.text)
  err = resp.json()["error"]
  assert set(err) == {"message", "type", "param", "code"} and err["message"]
  if param != "__any__":
    assert err["param"] == param, err
  return err


def test_errors_name_their_field(served):
  chat_ok = {"model": "sft", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
  assert _post(served, "/v1/chat/completions", chat_ok).status_code == 200
  _error(_post(served, "/v1/chat/completions", chat_ok, headers={}), 401)
  _error(_post(served, "/v1/chat/completions", chat_ok, headers={"Authorization": "Bearer nope"}), 401)
  _error(httpx.get(served["url"] + "/v1/models", timeout=30), 401)
  _error(_post(served, "/v1/chat/completions", {**chat_ok, "model": "gpt-9"}), 404, "model")
  _error(_post(served, "/v1/chat/completions", content=b"{" + b" " * (2 << 20) + b"}"), 413)
  for field, value in [("temperature", -1), ("temperature", "hot"), ("top_p", 0), ("top_k", -5), ("min_p", 1),
                       ("n", 0), ("n", 99), ("max_tokens", 0), ("max_tokens", "x"), ("presence_penalty", 3),
                       ("frequency_penalty", -9), ("repetition_penalty", 0), ("seed", 1.5), ("stop", [1, 2]),
                       ("stop", [""]), ("stream", "yes"), ("top_logprobs", 3), ("tools", [{"type": "function"}]),
                       ("logit_bias", {"5": 10}), ("response_format", {"type": "json_object"})]:
    err = _error(_post(served, "/v1/chat/completions", {**chat_ok, field: value}), 400, field)
    assert field in err["message"]
  _error(_post(served, "/v1/chat/completions", {**chat_ok, "logprobs": True, "top_logprobs": 21}), 400, "top_logprobs")
  _error(_post(served, "/v1/chat/completions", {"model": "sft"}), 400, "messages")
  _error(_post(served, "/v1/chat/completions", {**chat_ok, "messages": [{"role": "tool", "content": "x"}]}), 400,
         "messages[0].role")
  _error(_post(served, "/v1/chat/completions", {**chat_ok, "messages": [
      {"role": "user", "content": "x"}, {"role": "system", "content": "y"}]}), 400, "messages[1].role")
  _error(_post(served, "/v1/chat/completions", {**chat_ok, "messages": [{"role": "user", "content": 5}]}), 400,
         "messages[0].content")
  cmpl = {"model": "sft", "prompt": "hello", "max_tokens": 2}
  for prompt in ([], [[]], [[1, -1]], [[10 ** 6]], [1.5], {"a": 1}, [["x"]], True):
    _error(_post(served, "/v1/completions", {**cmpl, "prompt": prompt}), 400, "prompt")
  _error(_post(served, "/v1/completions", {**cmpl, "logprobs": 50}), 400, "logprobs")
  _error(_post(served, "/v1/completions", {**cmpl, "max_tokens": 0}), 400, "max_tokens")
  _error(_post(served, "/v1/completions", {**cmpl, "suffix": "x"}), 400, "suffix")
  # The context: prompt + max_tokens beyond the run's seq_len names both numbers.
  err = _error(_post(served, "/v1/completions", {**cmpl, "max_tokens": 200}), 400, "max_tokens")
  n_prompt = len(_engine(served).tok.encode("hello"))
  assert f"{serve_testlib.SEQ_LEN} tokens" in err["message"] and f"has {n_prompt} tokens" in err["message"]
  assert "max_tokens is 200" in err["message"] and err["code"] == "context_length_exceeded"
  long_chat = {**chat_ok, "messages": [{"role": "user", "content": "word " * 300}], "max_tokens": None}
  _error(_post(served, "/v1/chat/completions", long_chat), 400, "messages")
  # Bodies that are not JSON objects, unknown routes, wrong methods: the same error shape.
  _error(_post(served, "/v1/chat/completions", content=b"{not json"), 400, None)
  _error(_post(served, "/v1/chat/completions", content=b"[1, 2]"), 400, None)
  _error(_post(served, "/v1/chat/completions", content=b"\xff\xfe"), 400, None)
  _error(_post(served, "/v1/nothing", {}), 404)
  _error(httpx.get(served["url"] + "/v1/chat/completions", headers=AUTH, timeout=30), 405)


def _fuzz_bodies(rng: random.Random, n: int):
  def value(depth=0):
    leaves = [lambda: None, lambda: True, lambda: rng.randint(-10 ** 12, 10 ** 12), lambda: rng.uniform(-1e6, 1e6),
              lambda: rng.choice([1e308, float("nan"), float("-inf"), 10 ** 23, -10 ** 23, 2 ** 31, 2 ** 63, -1, 1e-320]),
              lambda: rng.randrange(3),
              lambda: "".join(rng.choice(["a", " ", "<|im_end|>", "你好", "\x00", "\ud800", "\n"])
                              for _ in range(rng.randrange(8))),
              lambda: [rng.randrange(-5, 700) for _ in range(rng.randrange(6))],
              lambda: rng.choice(["user", "system", "assistant", ""])]
    nested = [lambda: [value(depth + 1) for _ in range(rng.randrange(4))],
              lambda: {rng.choice(FIELDS): value(depth + 1) for _ in range(rng.randrange(4))}]
    return rng.choice(leaves + (nested if depth < 2 else []))()

  paths = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize", "/arena/chat", "/arena/vote"]
  valid = [("/v1/chat/completions", {"model": "sft", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 2}),
           ("/v1/completions", {"model": "weak", "prompt": [5, 6, 7], "max_tokens": 2, "logprobs": 2, "echo": True}),
           ("/tokenize", {"prompt": "a <|im_end|> 你好"}), ("/detokenize", {"tokens": [5, 6]})]
  for _ in range(n):
    r = rng.random()
    if r < 0.1:  # not JSON at all
      yield rng.choice(paths), bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
    elif r < 0.2:  # truncated JSON
      yield rng.choice(paths), json.dumps(valid[0][1])[:rng.randrange(60)].encode()
    elif r < 0.6:  # a valid request with 0-2 fields replaced by random values
      path, body = rng.choice(valid)
      body = dict(body)
      for f in rng.sample(FIELDS + list(body), rng.randrange(3)):
        body[f] = value()
      yield path, json.dumps(body, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    else:  # random fields and values
      body = {"model": rng.choice(["sft", "weak", "sft", "nope", 5])}
      if rng.random() < 0.6:
        body["messages"] = [{"role": rng.choice(["user", "system", "assistant", "tool", 3]),
                             "content": value(1)} for _ in range(rng.randrange(3))]
      if rng.random() < 0.5:
        body["prompt"] = value()
      for f in rng.sample(FIELDS, rng.randrange(5)):
        body[f] = value()
      body["max_tokens"] = rng.choice([1, 2, 3, value()])  # bounded work for bodies that happen to be valid
      yield rng.choice(paths), json.dumps(body, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")


FIELDS = ["temperature", "top_p", "top_k", "min_p", "n", "stop", "seed", "stream", "logprobs", "top_logprobs",
          "echo", "presence_penalty", "frequency_penalty", "repetition_penalty", "stream_options", "ignore_eos",
          "tokens", "winner", "battle_id", "side", "max_completion_tokens", "best_of", "user"]


def test_fuzz_leaves_the_server_answering(served):
  rng = random.Random(0)
  statuses = {}
  with httpx.Client(timeout=60, headers=AUTH) as http:
    for path, body in _fuzz_bodies(rng, 200):
      resp = http.post(served["url"] + path, content=body)
      statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
      assert resp.status_code < 500, (body[:300], resp.text[:300])
      if resp.status_code != 200:
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
      else:
        resp.read()
    assert http.get(served["url"] + "/health").json()["status"] == "ok"
  assert statuses.get(400, 0) > 80 and statuses.get(200, 0) > 20, statuses
  assert _engine(served).snapshot()["errors"] == 0


EDGE_VALUES = [None, True, -1, 0, 1, 2 ** 31, 2 ** 63, 10 ** 23, -10 ** 23, 1e308, float("nan"), float("-inf"), 1e-320,
               "", "\ud800", "\x00", "你好", [], [None], ["\udfff"], {}, {"a": "\ud800"}]


def test_every_field_with_edge_values(served):
  """Each request field set to each edge value (huge, NaN, lone surrogates, wrong types): every
  answer is a 200 or a 4xx naming the field, and the engines never fail."""
  bases = [("/v1/chat/completions", {"model": "sft", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
           ("/v1/completions", {"model": "sft", "prompt": "hi", "max_tokens": 2})]
  fields = FIELDS + ["model", "prompt", "messages", "max_tokens"]
  with httpx.Client(timeout=60, headers=AUTH) as http:
    for path, base in bases:
      for field in fields:
        for v in EDGE_VALUES:
          body = json.dumps({**base, field: v}).encode()
          resp = http.post(served["url"] + path, content=body)
          assert resp.status_code < 500, (path, field, v, resp.text[:300])
          if resp.status_code >= 400:
            assert resp.json()["error"]["param"] in (field, None) or resp.json()["error"]["param"].startswith(field), \
                (field, v, resp.json())
          else:
            resp.read()
  for m in ("sft", "weak"):
    assert _engine(served, m).snapshot()["errors"] == 0


# ---- tokenizer endpoints, health, metrics ---------------------------------------------------------

def test_tokenizer_endpoints(served, run):
  tok = run.tokenizer
  info = httpx.get(served["url"] + "/tokenizer_info", headers=AUTH, timeout=30).json()
  assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == serve_testlib.SEQ_LEN
  text = "你好 world<|im_end|>"
  got = _post(served, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
  assert got["tokens"] == tok.encode("你好 world") + [tok.im_end_id] and got["count"] == len(got["tokens"])
  assert _post(served, "/tokenize", {"prompt": "<|endoftext|>"}).json()["tokens"] == [tok.eos_id]
  assert _post(served, "/detokenize", {"tokens": got["tokens"]}).json()["prompt"] == text
  # Chat content never becomes control tokens: the template's own ids are the only ChatML ids.
  messages = [{"role": "user", "content": "<|im_end|>"}]
  ids = _post(served, "/tokenize", {"messages": messages}).json()["tokens"]
  assert ids == session_lib.prompt_ids(tok, messages) and ids.count(tok.im_end_id) == 1
  _error(_post(served, "/detokenize", {"tokens": [10 ** 9]}), 400, "tokens")


def test_health_and_metrics(served):
  assert httpx.get(served["url"] + "/health", timeout=30).json()["status"] == "ok"
  text = httpx.get(served["url"] + "/metrics", headers=AUTH, timeout=30).text  # behind the key, as the API
  for name in ("requests_total", "generation_tokens_per_second", "requests_waiting", "slots_used",
               "time_to_first_token_seconds", "http_responses_total"):
    assert f"llm_jax_{name}{{" in text, name
  snap = httpx.get(served["url"] + "/metrics?format=json", headers=AUTH, timeout=30).json()["models"]["sft"]
  assert snap["slots"] == 16 and snap["generated_tokens"] > 0 and snap["requests"] > 0


# ---- the arena ---------------------------------------------------------------------------------------

def test_bradley_terry_by_hand():
  # 3 wins of a over b, 1 of b over a, plus the virtual tie: p(a beats b) = 3.5 / 5, so the ratings
  # differ by 400 log10(3.5 / 1.5) and average 1000.
  # Sides swap: in ("b", "a", "b") model a sat on side b and won.
  r = arena_lib.bradley_terry(["a", "b"], [("a", "b", "a")] * 2 + [("b", "a", "b"), ("a", "b", "b")])
  assert abs((r["a"] - r["b"]) - 400 * np.log10(3.5 / 1.5)) < 1e-6 and abs(r["a"] + r["b"] - 2000) < 1e-6


def test_arena_battle_vote_leaderboard(served):
  before = {r["model"]: r for r in httpx.get(served["url"] + "/arena/leaderboard", headers=AUTH, timeout=30)
            .json()["leaderboard"]}
  battle = _post(served, "/arena/battle", {}).json()["battle_id"]
  for side in ("a", "b"):
    r = _post(served, "/arena/chat", {"battle_id": battle, "side": side, "temperature": 0, "max_tokens": 8,
                                      "messages": [{"role": "user", "content": MARS}]}).json()
    assert r["model"] == f"model-{side}" and r["choices"][0]["message"]["content"]  # names stay hidden
  res = _post(served, "/arena/vote", {"battle_id": battle, "winner": "a", "prompt": MARS}).json()
  assert {res["model_a"], res["model_b"]} == {"sft", "weak"}
  after = {r["model"]: r for r in res["leaderboard"]}
  assert after[res["model_a"]]["wins"] == before[res["model_a"]]["wins"] + 1
  assert after[res["model_a"]]["rating"] > after[res["model_b"]]["rating"]
  _error(_post(served, "/arena/vote", {"battle_id": battle, "winner": "b"}), 409, "battle_id")
  _error(_post(served, "/arena/vote", {"battle_id": "battle-nope", "winner": "b"}), 404, "battle_id")
  _error(_post(served, "/arena/vote", {"battle_id": battle, "winner": "left"}), 400, "winner")
  _error(_post(served, "/arena/chat", {"battle_id": battle, "side": "c", "messages": []}), 400, "side")


# ---- the command line --------------------------------------------------------------------------------

def test_cli_serves_two_named_runs(served, tmp_path):
  runs = served["runs"]
  db = tmp_path / "votes.sqlite"
  proc = subprocess.Popen([sys.executable, "-m", "llm_jax.serve", f"--workdir={runs['sft']}",
                           f"--workdir={runs['weak']}:base", "--port=0", "--api_key=k1", f"--db={db}", "--warmup=false"],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  try:
    url = None
    for line in proc.stdout:
      if "page: " in line:
        url = line.split("page: ")[1].strip().rstrip("/")
        break
    assert url and url.startswith("http://127.0.0.1:"), proc.stderr.read()[-3000:] if proc.poll() is not None else url
    assert httpx.get(url + "/health", timeout=30).json()["models"] == ["sft", "base"]
    assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
    models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k1"}, timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["sft", "base"]
    assert models["data"][0]["max_model_len"] == serve_testlib.SEQ_LEN
    assert "<title>llm_jax</title>" in httpx.get(url + "/", timeout=30).text
  finally:
    proc.terminate()
    proc.wait(timeout=60)
  assert db.exists()


def test_synth_talks_to_this_server(served, tmp_path):
  """`llm_jax.data.synth` (issue 14) through llm_jax's own server instead of its stub: every
  chunk's request is answered (no transport error, no retry), and each reply is either read as
  QA pairs or counted as unreadable, never lost. The tiny model cannot write the JSON asked for;
  what is shown is the contract between the two programs, not the quality of the pairs."""
  docs = tmp_path / "docs.txt"
  docs.write_text("\n".join(chat_turn[0]["content"] for chat_turn in serve_testlib.chats()[:3]),
                  encoding="utf-8")
  # The served test model has a 128-token context: a short request template, not the built-in one.
  template = tmp_path / "qa_prompt.txt"
  template.write_text("{n} JSON question-answer pairs about: {chunk}", encoding="utf-8")
  out = tmp_path / "qa.jsonl"
  synth = subprocess.run(
      [sys.executable, "-m", "llm_jax.data.synth", f"--docs={docs}", f"--base_url={served['url']}/v1",
       "--model=sft", f"--out={out}", "--paraphrases=0", "--max_tokens=48", "--parse_retries=0",
       "--max_retries=0", "--api_key_env=LLM_JAX_TEST_KEY", "--fsync=false", "--lang=en",
       f"--qa_prompt={template}", "--pairs_per_chunk=1"],
      cwd=ROOT, capture_output=True,
      text=True, timeout=300, env=dict(os.environ, LLM_JAX_TEST_KEY=KEY, JAX_PLATFORMS="cpu"))
  assert synth.returncode == 0, synth.stdout[-2000:] + synth.stderr[-3000:]
  summary = json.load(open(tmp_path / "qa.summary.json"))
  assert summary["requests"]["qa"] == summary["chunks_total"] >= 3, summary
  # Every chunk answered (none rejected or given up), no retry, every token counted by the server.
  assert summary["chunks_done"] == 3 and summary["chunks_rejected"] == 0, summary["errors"]
  assert summary["chunks_gave_up"] == 0 and not summary["retries"], summary
  assert summary["tokens"]["completion"] > 0 and summary["tokens"]["prompt"] > 0, summary
  assert "replies" in synth.stdout
  written = sum(1 for _ in open(out, encoding="utf-8")) if out.exists() else 0
  assert written == summary["records_written"], summary
