"""The training loop: resume equals an uninterrupted run, a non-finite loss stops it with the
last good checkpoint intact, init_from starts from another run's parameters."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from configs import sft as sft_config
from llm_jax.data import pipeline, tokenizer as tok_lib
from llm_jax import checkpoint, rundir
from llm_jax.train import loop


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
  result = loop.train_and_evaluate(cfg, str(tmp_path / "a"), batch_hook=_fingerprints(seen_a))
  # what seq_len keeps and drops, counted at start, is in the result and final_metrics.json
  # (the counts themselves are checked against the pipeline in test_data_shapes.py)
  final = json.load(open(tmp_path / "a" / "final_metrics.json"))
  assert final["data"]["train"] == result["data"]["train"]
  assert final["data"]["train"]["dropped"] > 0  # seq_len 64 drops some of the built-in chats
  assert final["data"]["train"]["seq_len_keep_95"] > 0

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
  pa, _ = rundir.load_params(str(tmp_path / "a"), 20)
  pb, _ = rundir.load_params(str(tmp_path / "b"), 20)
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
  params, _ = rundir.load_params(str(tmp_path))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_init_from_takes_parameters_only(tmp_path, tokenizer_path):
  pre = small_config(tokenizer_path, steps=5)
  pre.job, pre.data.mode, pre.data.train = "pretrain", "pretrain", "builtin:bios"
  loop.train_and_evaluate(pre, str(tmp_path / "pre"))
  p_pre, _ = rundir.load_params(str(tmp_path / "pre"))

  sft = small_config("", steps=1)  # no tokenizer given: it must come from the source run
  sft.model.dim = 48  # a different shape on the command line: the source's shape wins
  sft.model.scan_layers = False  # and its checkpoint layout (stacked layers)
  sft.init_from = str(tmp_path / "pre")
  sft.train.lr, sft.train.warmup_steps = 1e-4, 0
  out = loop.train_and_evaluate(sft, str(tmp_path / "sft"))
  assert out["step"] == 1  # a fresh optimizer and step count, not the source's
  p_sft, cfg_sft = rundir.load_params(str(tmp_path / "sft"))
  assert cfg_sft.model.dim == 32 and cfg_sft.model.scan_layers
  # Both runs carry their own copy of the tokenizer, and their configs point at it.
  for run in ("pre", "sft"):
    own = str(tmp_path / run / "tokenizer.model")
    assert rundir.read_config(str(tmp_path / run)).data.tokenizer.path == own
    assert open(own, "rb").read() == open(tokenizer_path, "rb").read()
  # One Adam step moves each weight by about lr; a fresh init would differ by ~init_std.
  for a, b in zip(jax.tree.leaves(p_pre), jax.tree.leaves(p_sft)):
    assert np.max(np.abs(a - b)) < 3e-4


def _damage(workdir: str, step: int) -> str:
  """Truncates the largest array file of a checkpoint, as a full disk or a killed copy would."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(workdir, "checkpoints", str(step)))
           for f in fs]
  victim = max(files, key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
  return victim


def test_damaged_newest_checkpoint_resumes_from_the_previous_one(tmp_path, tokenizer_path, caplog):
  import shutil
  cfg = small_config(tokenizer_path, steps=15)
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  loop.train_and_evaluate(cfg, a)
  assert checkpoint.steps(a) == [5, 10, 15]
  shutil.copytree(a, b)
  shutil.rmtree(os.path.join(b, "checkpoints", "15"))  # b: resumed from 10 by construction
  _damage(a, 15)  # a: the newest checkpoint is damaged

  more = small_config(tokenizer_path, steps=20)
  with caplog.at_level("WARNING"):
    loop.train_and_evaluate(more, a)
  loop.train_and_evaluate(more, b)
  log = "\n".join(caplog.messages)
  assert "checkpoint 15" in log and "cannot be read" in log and "trying step 10" in log
  # Kept for the user, out of the way of the resumed run (which wrote its own step 15).
  assert os.path.isdir(os.path.join(a, checkpoint.DAMAGED_DIR, "15"))
  assert checkpoint.steps(a) == checkpoint.steps(b)
  pa, _ = rundir.load_params(a, 20)
  pb, _ = rundir.load_params(b, 20)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(x, y)


def test_throughput_after_an_eval_without_checkpoint_is_normal(tmp_path, tokenizer_path, caplog):
  cfg = small_config(tokenizer_path, steps=30)
  cfg.train.eval_every, cfg.train.eval_batches, cfg.train.log_every = 10, 2, 10
  cfg.data.eval = "builtin:bios_qa_heldout"
  cfg.checkpoint.every = 100  # evals at 10 and 20 fall on steps without a checkpoint
  with caplog.at_level("INFO"):
    loop.train_and_evaluate(cfg, str(tmp_path))
  rates = [float(m.split(" tokens/s")[0].rsplit("| ", 1)[1].replace(",", ""))
           for m in caplog.messages if " tokens/s" in m]
  assert len(rates) == 3, caplog.messages
  assert max(rates) < 10 * min(rates), rates  # was ~1000x after an eval step
  # Each eval says what it scored (issue 24: the training log's and the eval job's losses differ
  # because they score different parts of the held-out set). Counted here from the eval batches
  # themselves: documents are (row, segment) pairs with a weighted target.
  tok = tok_lib.get_tokenizer(cfg.data.tokenizer, str(tmp_path), None)
  batches = pipeline.make_eval_iterator(cfg.data, tok, process_index=0, process_count=1)
  documents = tokens = 0
  for _, batch in zip(range(2), batches):
    w, seg = np.asarray(batch["loss_weights"]), np.asarray(batch["segment_ids"])
    documents += len({(r, seg[r, c]) for r, c in zip(*np.nonzero((w > 0) & (seg > 0)))})
    tokens += int(w.sum())
  evals = [m for m in caplog.messages if m.startswith("eval at step")]
  assert len(evals) == 4 and all(
      m.endswith(f"(2 batches, {documents:,} documents, {tokens:,} tokens)") for m in evals), evals
  assert any(m.startswith("eval every 10 steps on builtin:bios_qa_heldout: its first 2 batches")
             for m in caplog.messages)


def test_resume_refuses_a_shape_or_tokenizer_it_cannot_honour(tmp_path, tokenizer_path):
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(small_config("", steps=5), workdir)
  bigger = small_config("", steps=10)
  bigger.model.dim = 64
  with pytest.raises(ValueError, match=r"config.model.dim=64: .* model.dim=32 .*another --workdir"):
    loop.train_and_evaluate(bigger, workdir)
  other = tok_lib.train_sentencepiece(pipeline.corpus_texts(small_config("").data), vocab_size=500)
  other_tok = small_config(other.save(str(tmp_path / "other")), steps=10)
  with pytest.raises(ValueError, match=r"config.data.tokenizer.path=.*cannot switch tokenizers"):
    loop.train_and_evaluate(other_tok, workdir)
  vocab = small_config("", steps=10)
  vocab.data.tokenizer.vocab_size = 900
  with pytest.raises(ValueError, match=r"config.data.tokenizer.vocab_size=900"):
    loop.train_and_evaluate(vocab, workdir)
  assert checkpoint.steps(workdir) == [5]  # nothing was changed
  # The same config resumes; vocab_size 0 ("from the tokenizer") is fine too.
  same = small_config("", steps=6)
  same.model.vocab_size = 0
  assert loop.train_and_evaluate(same, workdir)["step"] == 6
