"""Sampling filters and penalties on hand-made distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.infer.sampling import SamplingConfig, apply_penalties, filter_logits, sample

PROBS = np.array([0.5, 0.2, 0.15, 0.1, 0.05])


def _settings(batch, **kw):
  return {k: jnp.asarray(v) for k, v in SamplingConfig(**kw).arrays(batch).items()}


def _kept(logits, **kw):
  out = np.asarray(filter_logits(jnp.asarray(logits)[None], _settings(1, **kw)))[0]
  return set(np.flatnonzero(out > -1e29).tolist())


@pytest.mark.parametrize("top_p,want", [(0.3, {0}), (0.6, {0, 1}), (0.8, {0, 1, 2}), (0.96, {0, 1, 2, 3, 4}),
                                        (1.0, {0, 1, 2, 3, 4})])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, want):
  # Shuffled so that "sorted" cannot be confused with "original order".
  order = np.array([3, 0, 4, 1, 2])
  logits = np.log(PROBS[order])
  assert _kept(logits, top_p=top_p) == {int(np.flatnonzero(order == i)[0]) for i in want}


def test_top_p_samples_only_from_the_nucleus_in_proportion():
  n = 4000
  logits = jnp.tile(jnp.log(jnp.asarray(PROBS)), (n, 1))
  zeros = jnp.zeros((n, 5), jnp.int32)
  draws = np.asarray(sample(jax.random.key(0), logits, zeros > 0, zeros, _settings(n, top_p=0.6)))
  counts = np.bincount(draws, minlength=5)
  assert counts[2:].sum() == 0
  assert abs(counts[0] / n - 0.5 / 0.7) < 0.03  # renormalised over {0, 1}


@pytest.mark.parametrize("k,want", [(1, {0}), (2, {0, 1}), (4, {0, 1, 2, 3}), (0, {0, 1, 2, 3, 4})])
def test_top_k(k, want):
  assert _kept(np.log(PROBS), top_k=k) == want


def test_min_p_is_relative_to_the_top_token():
  assert _kept(np.log(PROBS), min_p=0.25) == {0, 1, 2}  # p >= 0.25 * 0.5


def test_top_k_1_equals_greedy():
  logits = jax.random.normal(jax.random.key(1), (64, 50)) * 3
  zeros = jnp.zeros((64, 50), jnp.int32)
  for seed in range(3):
    got = sample(jax.random.key(seed), logits, zeros > 0, zeros, _settings(64, temperature=1.5, top_k=1))
    np.testing.assert_array_equal(np.asarray(got), np.argmax(np.asarray(logits), axis=-1))
  greedy = sample(jax.random.key(0), logits, zeros > 0, zeros, _settings(64, temperature=0.0))
  np.testing.assert_array_equal(np.asarray(greedy), np.argmax(np.asarray(logits), axis=-1))


@pytest.mark.parametrize("token", [0, 1], ids=["positive_logit", "negative_logit"])
def test_repetition_penalty_lowers_a_seen_token(token):
  logits = jnp.array([[2.0, -1.0, 0.5, -0.3]])
  seen = jnp.zeros((1, 4), bool).at[0, token].set(True)
  counts = jnp.zeros((1, 4), jnp.int32)
  before = np.asarray(jax.nn.softmax(logits))[0, token]
  penalised = apply_penalties(logits, seen, counts, _settings(1, repetition_penalty=1.5))
  after = np.asarray(jax.nn.softmax(penalised))[0, token]
  assert after < before
  want = 2.0 / 1.5 if token == 0 else -1.0 * 1.5
  assert np.isclose(float(penalised[0, token]), want)


def test_presence_and_frequency_penalties():
  logits = jnp.zeros((1, 4))
  counts = jnp.array([[0, 1, 3, 0]], jnp.int32)
  out = apply_penalties(logits, counts > 0, counts, _settings(1, presence_penalty=0.5, frequency_penalty=0.25))
  np.testing.assert_allclose(np.asarray(out)[0], [0.0, -0.75, -1.25, 0.0], atol=1e-6)


def test_bad_settings_name_the_field():
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(top_p=0.0).validate()
  with pytest.raises(ValueError, match="temperature"):
    SamplingConfig(temperature=-1.0).validate()
