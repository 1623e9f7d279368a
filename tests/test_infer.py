"""KV-cache generation against full recomputation without a cache, plus stopping and streaming."""

import dataclasses

import jax
import numpy as np
import pytest

from llm_jax.infer.generate import Generator, bucket
from llm_jax.infer.sampling import SamplingConfig
from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder
from tests.model_reference import random_params
from tests.numerics import assert_close

jax.config.update("jax_default_matmul_precision", "highest")

CFG = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48,
                  qkv_bias=True, init_std=0.3, tie_embeddings=False)
PROMPTS = [[5, 17, 3], [9, 1, 44, 60, 2, 8, 71, 30, 12, 4, 6], [33], [70, 21, 5, 5, 19, 81]]


def _decode(ids):  # a toy detokenizer: one letter per id
  return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.fixture(scope="module")
def params():
  return random_params(CFG, seed=0)


@pytest.fixture(scope="module")
def greedy64(params):
  return Generator(params, CFG).generate(PROMPTS, SamplingConfig(temperature=0.0, max_new_tokens=64),
                                         return_logprobs=True)


def test_bucket():
  assert [bucket(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]


def test_greedy_cache_equals_no_cache_argmax(params, greedy64):
  """Each generated token is the argmax of a plain causal forward over prompt + tokens so far, and
  its log-prob is that forward's log-softmax."""
  # One plain forward over all rows, right-padded (padding after a sequence cannot affect it).
  seqs = [prompt + gen.tokens[:-1] for prompt, gen in zip(PROMPTS, greedy64)]
  n = max(map(len, seqs))
  ids = np.array([s + [0] * (n - len(s)) for s in seqs], np.int32)
  pos = np.tile(np.arange(n, dtype=np.int32), (len(seqs), 1))
  seg = (pos < np.array([len(s) for s in seqs])[:, None]).astype(np.int32)
  all_logits = np.asarray(jax.jit(Decoder(CFG).apply)({"params": params}, ids, pos, seg))
  for row, (prompt, gen) in enumerate(zip(PROMPTS, greedy64)):
    assert gen.finish_reason == "length" and len(gen.tokens) == 64
    logits = all_logits[row, len(prompt) - 1:len(prompt) + 63]
    np.testing.assert_array_equal(np.argmax(logits, axis=-1), gen.tokens)
    want_lp = np.asarray(jax.nn.log_softmax(logits))[np.arange(64), gen.tokens]
    assert_close(gen.logprobs, want_lp, rel=2e-5)


def test_batched_equals_one_by_one(params, greedy64):
  gen = Generator(params, CFG)
  for prompt, batched in zip(PROMPTS, greedy64):
    alone = gen.generate([prompt], SamplingConfig(temperature=0.0, max_new_tokens=64))[0]
    assert alone.tokens == batched.tokens


def test_seed_reproduces_and_differs(params):
  gen = Generator(params, CFG)
  s = dict(temperature=1.0, top_p=0.95, max_new_tokens=24)
  a = gen.generate(PROMPTS[:2], SamplingConfig(seed=7, **s))
  b = gen.generate(PROMPTS[:2], SamplingConfig(seed=7, **s))
  c = gen.generate(PROMPTS[:2], SamplingConfig(seed=8, **s))
  assert [g.tokens for g in a] == [g.tokens for g in b]
  assert [g.tokens for g in a] != [g.tokens for g in c]


def test_chunked_decoding_equals_one_step_per_call(params):
  """Decoding `Generator.chunk` tokens per device call (a scan) gives exactly the tokens and
  log-probs of one step per call, sampled with penalties, and stops (end token, per-row limits)
  land on the same token mid-chunk."""
  s = [SamplingConfig(temperature=1.0, top_k=20, repetition_penalty=1.2, frequency_penalty=0.3,
                      max_new_tokens=n, seed=11 + n) for n in (37, 21, 40, 5)]
  def run(chunk, stop_ids):  # chunk 10**9: every token by itself
    gen = Generator(params, CFG)
    gen.chunk = chunk
    return gen.generate(PROMPTS, s, stop_token_ids=stop_ids, return_logprobs=True)

  end = run(10 ** 9, [])[2].tokens[9]  # a token that ends row 2 at its 10th token or before
  chunked, single = run(4, [end]), run(10 ** 9, [end])
  assert [g.tokens for g in chunked] == [g.tokens for g in single]
  assert [g.finish_reason for g in chunked] == [g.finish_reason for g in single]
  for a, b in zip(chunked, single):
    assert_close(a.logprobs, b.logprobs, rel=1e-6)
  assert {g.finish_reason for g in single} == {"stop", "length"}  # both kinds of stop happened


def test_end_tokens_and_stop_strings_stop(params, greedy64):
  gen = Generator(params, CFG)
  ref = greedy64[1].tokens
  # End token: the 10th greedy token; generation stops at its first occurrence, without it.
  end = ref[9]
  got = gen.generate([PROMPTS[1]], SamplingConfig(temperature=0.0, max_new_tokens=64), stop_token_ids=[end])[0]
  assert got.finish_reason == "stop" and got.tokens == ref[:ref.index(end)]
  # Stop string: the text of greedy tokens 6..7; generation stops at the token completing its first
  # occurrence and the text is cut before it.
  text = _decode(ref)
  stop = text[6:8]
  first = text.index(stop)
  got = gen.generate([PROMPTS[1]], SamplingConfig(temperature=0.0, max_new_tokens=64), stop_strings=[stop],
                     decode_fn=_decode)[0]
  assert got.finish_reason == "stop"
  assert got.tokens == ref[:first + len(stop)]
  assert got.text == text[:first]


def test_callback_receives_exactly_the_returned_tokens(params):
  streamed = {}
  out = Generator(params, CFG).generate(
      PROMPTS, SamplingConfig(temperature=0.9, max_new_tokens=20, seed=3), stop_token_ids=[0, 1, 2],
      callback=lambda row, tok: streamed.setdefault(row, []).append(tok))
  assert [streamed.get(i, []) for i in range(len(PROMPTS))] == [g.tokens for g in out]


def test_sampling_does_not_depend_on_the_batch(params):
  """The same prompt and seed give the same sample alone or among other prompts."""
  cfg = CFG
  gen = Generator(params, cfg)
  rng = np.random.default_rng(3)
  prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (5, 9, 3, 12)]
  s = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=7)
  together = gen.generate(prompts, s)
  for p, t in zip(prompts, together):
    assert gen.generate([p], s)[0].tokens == t.tokens
  same = gen.generate([prompts[0]] * 3, s)
  assert same[0].tokens == same[1].tokens == same[2].tokens  # same seed, same prompt
  seeds = gen.generate([prompts[0]] * 2, [s, dataclasses.replace(s, seed=8)])
  assert seeds[0].tokens == same[0].tokens and seeds[1].tokens != seeds[0].tokens
