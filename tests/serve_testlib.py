"""Shared pieces of the serving tests: a tiny *trained* chat run (seconds to train), a second
weaker run for the arena, and a server on a free 127.0.0.1 port.

The runs are trained once per pytest session (cached here) on a few bilingual question-answer
chats, so greedy answers are decisive (no near-ties that one float32 ulp could flip).
"""

from __future__ import annotations

import os

import numpy as np

from configs import sft
from llm_jax.data.chat_template import encode_chat
from llm_jax.data.tokenizer import train_sentencepiece
from llm_jax.model.config import ModelConfig
from llm_jax import rundir

SEQ_LEN = 128  # the runs' context limit (config.data.seq_len)
FACTS = [
    ("What is the capital of Mars?", "The capital of Mars is Olympus City."),
    ("Who wrote the Moon Book?", "Ada Lin wrote the Moon Book in 1901."),
    ("What colour is the sky on Venus?", "The sky on Venus is yellow and warm."),
    ("How many legs does a zorb have?", "A zorb has seven legs and two tails."),
    ("火星的首都是什么？", "火星的首都是奥林匹斯城。"),
    ("谁写了月亮之书？", "林艾达在一九零一年写了月亮之书。"),
    ("你好", "你好！我是一个小模型，很高兴见到你。"),
    ("Tell me a story.", "Once upon a time a small robot learned to sing. It sang every morning."),
]
_CACHE: dict = {}


def chats() -> list[list[dict]]:
  out = []
  for q, a in FACTS:
    out.append([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
    out.append([{"role": "system", "content": "Be brief."}, {"role": "user", "content": q},
                {"role": "assistant", "content": a}])
  return out


def _train(tok, cfg, snapshots: tuple[int, ...], seed: int) -> dict:
  """{step: (params, loss)} at each step in `snapshots`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from llm_jax.model.decoder import Decoder  # pylint: disable=g-import-not-at-top
  from tests.model_reference import random_params  # pylint: disable=g-import-not-at-top

  rows = [encode_chat(tok, c) for c in chats()]
  length = max(len(ids) for ids, _ in rows) - 1
  inputs = np.zeros((len(rows), length), np.int32)
  targets = np.zeros_like(inputs)
  weights = np.zeros((len(rows), length), np.float32)
  segments = np.zeros_like(inputs)
  for r, (ids, w) in enumerate(rows):
    n = len(ids) - 1
    inputs[r, :n], targets[r, :n], weights[r, :n], segments[r, :n] = ids[:-1], ids[1:], w[1:], 1
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), inputs.shape)
  # Every token is a target (plain LM loss on the whole chat, answers weighted up) so the model also
  # knows the prompt text it is asked to score.
  loss_w = 0.2 * (segments > 0) + weights
  opt = optax.adam(1e-2)

  def loss_fn(params):
    logits = Decoder(cfg).apply({"params": params}, inputs, positions, segments)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(ce * loss_w) / jnp.sum(loss_w)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params = random_params(cfg, seed=seed, std=0.05)
  opt_state = opt.init(params)
  out = {}
  for k in range(1, max(snapshots) + 1):
    params, opt_state, loss = step(params, opt_state)
    if k in snapshots:
      out[k] = (params, float(loss))
  return out


def make_runs(root: str) -> dict:
  """{"sft": workdir of the well-trained run, "weak": a briefly trained one}, sharing a tokenizer."""
  if root in _CACHE:
    return _CACHE[root]
  if all(os.path.isdir(os.path.join(root, n, "checkpoints")) for n in ("sft", "weak")):
    _CACHE[root] = {n: os.path.join(root, n) for n in ("sft", "weak")}  # trained by an earlier call
    return _CACHE[root]
  texts = [m["content"] for c in chats() for m in c] + ["user\n", "assistant\n", "system\n"]
  tok = train_sentencepiece(texts * 4, vocab_size=512)
  config = sft.get_config()
  config.model.update(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128, vocab_size=tok.vocab_size,
                      scan_layers=False)
  config.data.seq_len = SEQ_LEN
  cfg = ModelConfig.from_config(config.model)
  out = {}
  trained = _train(tok, cfg, (15, 150), seed=1)
  for name, steps in (("sft", 150), ("weak", 15)):
    workdir = os.path.join(root, name)
    os.makedirs(workdir, exist_ok=True)
    tok.save(workdir)
    params, loss = trained[steps]
    rundir.save_params(workdir, params, config, step=steps)
    out[name] = workdir
    out[name + "_loss"] = loss
  _CACHE[root] = out
  return out


API_KEY = "test-key"
_SERVER: dict = {}


def session_server(tmp_path_factory) -> dict:
  """One in-process server for the whole session: the trained run as "sft", the weak one as
  "weak", every prefill/decode shape compiled before the first test (so tests can assert that no
  request compiles anything). {"url", "runs", "app", "server"}."""
  if "url" in _SERVER:
    return _SERVER
  from llm_jax.serve import server, slots  # pylint: disable=g-import-not-at-top
  from llm_jax.serve.app import create_app  # pylint: disable=g-import-not-at-top
  root = str(tmp_path_factory.getbasetemp() / "serve")
  runs = make_runs(root)
  # Chunks of 64 tokens (prompts longer than that are prefilled in pieces) and attention windows
  # of 64 and 128: few shapes, so compiling them all takes seconds.
  models = [server.load_model(runs["sft"], prefill_chunk=64, min_bucket=64),
            server.load_model(runs["weak"], prefill_chunk=64, min_bucket=64)]
  for m in models:
    m.engine.warmup(logprobs=True)
  compiled = (slots.prefill_chunk._cache_size(), slots.decode_step._cache_size())  # pylint: disable=protected-access
  app = create_app(models, api_key=API_KEY, db_path=os.path.join(root, "arena.sqlite"),
                   max_body_bytes=1 << 20, arena_seed=0)
  srv = server.BackgroundServer(app).start()
  _SERVER.update(url=srv.url, runs=runs, app=app, server=srv, compiled_after_warmup=compiled)
  return _SERVER


def stop_session_server() -> None:
  srv = _SERVER.pop("server", None)
  _SERVER.clear()
  if srv is not None:
    srv.stop()
