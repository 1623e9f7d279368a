"""The training loop: resume equals an uninterrupted run, a non-finite loss stops it with the
last good checkpoint intact, init_from starts from another run's parameters."""

import os
import signal

import jax
import numpy as np
import pytest

from configs import sft as sft_config
from llm_jax.data import pipeline, tokenizer as tok_lib
from llm_jax.train import checkpoint, loop


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tok"))
  cfg = small_config("")
  tok_lib.get_tokenizer(cfg.data.tokenizer, d, lambda: pipeline.corpus_texts(cfg.data))
  return os.path.join(d, "tokenizer.model")


def small_config(tokenizer_path, steps=20):
  c = sft_config.get_config()
  c.model.dim, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 32, 2, 4, 2
  c.model.mlp_dim = 64
  c.data.seq_len, c.data.batch_size = 64, 4
  c.data.synthetic.n_entities = 40
  c.data.tokenizer.path = tokenizer_path
  c.data.tokenizer.vocab_size = 600
  c.train.steps, c.train.warmup_steps, c.train.log_every = steps, 2, 5
  c.train.eval_every = 0
  c.checkpoint.every = 5
  return c


def _fingerprints(store):
  def hook(step, batch):
    store.append((step, {k: v.copy() for k, v in batch.items()}))
  return hook


def test_resume_after_sigterm_equals_uninterrupted(tmp_path, tokenizer_path):
  cfg = small_config(tokenizer_path)
  seen_a = []
  loop.train_and_evaluate(cfg, str(tmp_path / "a"), batch_hook=_fingerprints(seen_a))

  seen_b = []
  record = _fingerprints(seen_b)

  def preempt_at_9(step, batch):
    record(step, batch)
    if step == 9:  # the 10th update is the last before the stop
      os.kill(os.getpid(), signal.SIGTERM)

  first = loop.train_and_evaluate(cfg, str(tmp_path / "b"), batch_hook=preempt_at_9)
  assert first["step"] == 10
  assert checkpoint.steps(str(tmp_path / "b")) == [5, 10]
  second = loop.train_and_evaluate(cfg, str(tmp_path / "b"), batch_hook=record)
  assert second["step"] == 20

  assert [s for s, _ in seen_b] == list(range(20)) == [s for s, _ in seen_a]
  for (_, a), (_, b) in zip(seen_a, seen_b):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  pa, _ = checkpoint.load_params(str(tmp_path / "a"), 20)
  pb, _ = checkpoint.load_params(str(tmp_path / "b"), 20)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(x, y)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tokenizer_path):
  cfg = small_config(tokenizer_path)

  def poison_at_12(step, batch):
    if step == 12:
      batch["loss_weights"][:] = np.nan

  with pytest.raises(FloatingPointError, match=r"loss .*nan at step 13.*last good checkpoint is step 10"):
    loop.train_and_evaluate(cfg, str(tmp_path), batch_hook=poison_at_12)
  assert checkpoint.steps(str(tmp_path)) == [5, 10]
  params, _ = checkpoint.load_params(str(tmp_path))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_init_from_takes_parameters_only(tmp_path, tokenizer_path):
  pre = small_config(tokenizer_path, steps=5)
  pre.job, pre.data.mode, pre.data.train = "pretrain", "pretrain", "builtin:bios"
  loop.train_and_evaluate(pre, str(tmp_path / "pre"))
  p_pre, _ = checkpoint.load_params(str(tmp_path / "pre"))

  sft = small_config("", steps=1)  # no tokenizer given: it must come from the source run
  sft.model.dim = 48  # a different shape on the command line: the source's shape wins
  sft.model.scan_layers = False  # and its checkpoint layout (stacked layers)
  sft.init_from = str(tmp_path / "pre")
  sft.train.lr, sft.train.warmup_steps = 1e-4, 0
  out = loop.train_and_evaluate(sft, str(tmp_path / "sft"))
  assert out["step"] == 1  # a fresh optimizer and step count, not the source's
  p_sft, cfg_sft = checkpoint.load_params(str(tmp_path / "sft"))
  assert cfg_sft.model.dim == 32 and cfg_sft.model.scan_layers
  # Both runs carry their own copy of the tokenizer, and their configs point at it.
  for run in ("pre", "sft"):
    own = str(tmp_path / run / "tokenizer.model")
    assert checkpoint.read_config(str(tmp_path / run)).data.tokenizer.path == own
    assert open(own, "rb").read() == open(tokenizer_path, "rb").read()
  # One Adam step moves each weight by about lr; a fresh init would differ by ~init_std.
  for a, b in zip(jax.tree.leaves(p_pre), jax.tree.leaves(p_sft)):
    assert np.max(np.abs(a - b)) < 3e-4
