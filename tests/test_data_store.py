"""The token store: its batches are the on-the-fly pipeline's (every packing mode, a mixture of
sources, cut documents, a skipped bad record), host shards make up the global batch, the step
alone resumes it, and prepare resumes, refuses changed inputs, names bad records and never
leaves a store that training would accept half-written."""

import json
import os
import random

import numpy as np
import pytest

from configs import data as data_config
from llm_jax.data import pipeline, store as store_lib, store_batches, store_build
from llm_jax.data import tokenizer as tok_lib
from tests import resident

KEYS = ("inputs", "targets", "loss_weights", "segment_ids", "positions")
WORDS = "alpha beta gamma delta 北京 上海 数据 模型 one two three 🙂。".split()


def _docs(n, seed, max_words):
  rng = random.Random(seed)
  return [f"doc{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))
          for i in range(n)]


def _write_jsonl(path, records, bad_line=None):
  lines = [json.dumps(r, ensure_ascii=False) for r in records]
  if bad_line is not None:
    lines.insert(bad_line - 1, '{"text": "unterminated')
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  d = tmp_path_factory.mktemp("corpus")
  text = _write_jsonl(d / "text.jsonl", [{"text": t} for t in _docs(70, 1, 30)], bad_line=5)
  chats = [{"messages": [{"role": "user", "content": t[-2:]},
                         {"role": "assistant", "content": t}]} for t in _docs(40, 2, 6)]
  chat = _write_jsonl(d / "chat.jsonl", chats)
  tok_dir = str(d / "tok")
  # Role names as single pieces, so that short chats fit seq_len with their answer.
  tok = tok_lib.train_sentencepiece(_docs(200, 0, 30) + ["user\nassistant\n"] * 200,
                                    vocab_size=300)
  tok.save(tok_dir)
  return {"dir": d, "text": text, "chat": chat, "tok": tok,
          "tok_path": os.path.join(tok_dir, tok_lib.MODEL_FILE)}


class _Config:
  """What prepare reads of a job config: `.data`."""

  def __init__(self, data):
    self.data = data


def _data_cfg(corpus, mode, **kw):
  cfg = data_config.get_config()
  cfg.train = f"{corpus['text']}@2,{corpus['chat']}"
  cfg.mode, cfg.seq_len, cfg.batch_size = mode, 32, 4
  cfg.skip_bad_records, cfg.max_doc_chars = True, 40  # a bad line; documents cut in pieces
  cfg.tokenizer.path = corpus["tok_path"]
  cfg.update(kw)
  return cfg


@pytest.fixture(scope="module")
def stores(corpus, tmp_path_factory):
  out = {}
  for mode in ("pretrain", "sft"):
    d = str(tmp_path_factory.mktemp(f"store_{mode}"))
    report = store_build.prepare(_Config(_data_cfg(corpus, mode)), d, workers=2, shard_records=9,
                                 quiet=True)
    assert report.shards_written == 8 + 5 and report.skipped_records == 1
    out[mode] = d
  return out


@pytest.mark.parametrize("mode, packing", [
    ("pretrain", "concat_then_split"), ("pretrain", "first_fit"), ("pretrain", "none"),
    ("sft", "best_fit"), ("sft", "first_fit")])
def test_store_batches_equal_the_on_the_fly_pipeline(corpus, stores, mode, packing):
  cfg = _data_cfg(corpus, mode, packing=packing)
  fly = pipeline.make_train_iterator(cfg, corpus["tok"], seed=3)
  cfg_store = _data_cfg(corpus, mode, packing=packing, train=f"tokens:{stores[mode]}")
  got = pipeline.make_train_iterator(cfg_store, corpus["tok"], seed=3)
  assert isinstance(got, store_batches.StoreIterator)
  untrained = 0
  for _ in range(40):  # several epochs of the smaller source
    want, have = next(fly), next(got)
    for k in KEYS:
      assert have[k].dtype == want[k].dtype
      np.testing.assert_array_equal(have[k], want[k], err_msg=k)
    untrained += int(((want["loss_weights"] == 0) & (want["segment_ids"] > 0)).sum())
  assert (untrained > 0) == (mode == "sft")  # prompts are not trained on in SFT


def test_an_sft_store_trains_pretraining_too(corpus, stores):
  cfg = _data_cfg(corpus, "pretrain")
  want = next(pipeline.make_train_iterator(cfg, corpus["tok"], seed=1))
  cfg.train = stores["sft"]  # the directory itself names a store too
  have = next(pipeline.make_train_iterator(cfg, corpus["tok"], seed=1))
  for k in KEYS:
    np.testing.assert_array_equal(have[k], want[k])


def test_host_shards_make_the_global_batch_and_the_step_alone_resumes(corpus, stores):
  cfg = _data_cfg(corpus, "sft", train=f"tokens:{stores['sft']}", batch_size=6)
  whole = pipeline.make_train_iterator(cfg, corpus["tok"], seed=4)
  hosts = [pipeline.make_train_iterator(cfg, corpus["tok"], seed=4, process_index=p,
                                        process_count=2) for p in range(2)]
  read = []
  for h in hosts:  # count the rows each host reads from the store
    real = h._materialize  # pylint: disable=protected-access
    h._materialize = lambda rows, real=real: (read.append(len(rows)), real(rows))[1]  # pylint: disable=protected-access
  batches = []
  for _ in range(7):
    g = next(whole)
    parts = [next(h) for h in hosts]
    assert parts[0]["inputs"].shape == (3, 32)
    for k in KEYS:
      np.testing.assert_array_equal(np.concatenate([parts[0][k], parts[1][k]]), g[k])
    batches.append(g)
  assert read == [3] * 14
  state = whole.get_state()
  # Every process saves the same state (the packer's snapshot at the next global batch).
  assert hosts[0].get_state() == hosts[1].get_state() == state
  assert json.loads(state)["step"] == 7
  expected = [next(whole) for _ in range(3)]
  resumed = pipeline.make_train_iterator(cfg, corpus["tok"], seed=4)
  resumed.set_state(json.dumps({"step": 7}).encode())  # the step alone positions the stream
  for want in expected:
    have = next(resumed)
    for k in KEYS:
      np.testing.assert_array_equal(have[k], want[k])
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["inputs"], expected[0]["inputs"])


@pytest.mark.parametrize("mode, packing", [
    ("pretrain", "concat_then_split"), ("pretrain", "first_fit"), ("pretrain", "none"),
    ("sft", "best_fit")])
def test_the_saved_plan_snapshot_resumes_exactly_without_replaying(corpus, stores, mode,
                                                                   packing):
  """A state saved at any step resumes bit-identically from its packer snapshot, reading only
  the records of the batches from there (not the whole history, as the step alone does), on one
  process and on each of two."""
  cfg = _data_cfg(corpus, mode, packing=packing, train=f"tokens:{stores[mode]}", batch_size=2,
                  packing_bins=3)
  run = pipeline.make_train_iterator(cfg, corpus["tok"], seed=5)
  states, batches = {}, []
  for step in range(60):
    states[step] = run.get_state()
    batches.append(next(run))
  for step in (1, 17, 44, 59):
    state = json.loads(states[step])
    assert len(states[step]) < 400 and state["step"] == step
    plan = state["plan"]
    assert plan["row"] <= 2 * step
    if packing in ("concat_then_split", "none"):  # a boundary after every row
      assert plan["row"] == 2 * step
    for p in range(2):
      it = pipeline.make_train_iterator(cfg, corpus["tok"], seed=5, process_index=p,
                                        process_count=2)
      it.set_state(states[step])
      after_snapshot = it._examples.records_read  # pylint: disable=protected-access
      for want in batches[step:step + 2]:
        have = next(it)
        for k in KEYS:
          np.testing.assert_array_equal(have[k], want[k][p:p + 1], err_msg=k)
    replay = pipeline.make_train_iterator(cfg, corpus["tok"], seed=5)
    replay.set_state(json.dumps({"step": step}))  # the step alone: replays from row 0
    np.testing.assert_array_equal(next(replay)["inputs"], batches[step]["inputs"])
    replayed = replay._examples.records_read  # pylint: disable=protected-access
    # The snapshot costs at most one flush of 3 bins (a few records), whatever the step.
    assert after_snapshot <= 12, (after_snapshot, replayed)
    if step >= 17:
      assert replayed > 3 * after_snapshot
  # A snapshot of another configuration is not used: the step replays instead, still exactly.
  other = pipeline.make_train_iterator(_data_cfg(corpus, mode, packing=packing,
                                                 train=f"tokens:{stores[mode]}", batch_size=2,
                                                 packing_bins=4), corpus["tok"], seed=5)
  other.set_state(states[44])
  assert other._examples.records_read > 12  # pylint: disable=protected-access


def test_the_census_of_an_sft_store_equals_the_sources_census(corpus, stores):
  """Examples kept, cut and dropped at seq_len, counted at start, are the same whether the job
  reads the sources or their store (the skipped bad record aside: the store has no trace of
  it beyond its manifest)."""
  from llm_jax.data import census
  for seq_len in (12, 32):
    want = census.count(_data_cfg(corpus, "sft", seq_len=seq_len), corpus["tok"], "train")
    have = census.count(_data_cfg(corpus, "sft", seq_len=seq_len, train=stores["sft"]),
                        corpus["tok"], "train")
    assert want["dropped"] > 0 or seq_len == 32
    assert want["bad_records"] == 1 and have["bad_records"] == 0
    for c in (want, have):
      del c["bad_records"]
    assert have == want


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux /proc")
def test_reading_a_store_keeps_its_resident_pages_bounded(corpus, tmp_path):
  """A long read over a store holds at most about the release budget of its pages resident
  (the pages stay in the page cache, not in the process), and without releases it would hold
  the whole store: the bound is what keeps a large store at a small one's memory."""
  rng = np.random.default_rng(0)
  chars = np.array([ord(c) for c in "北京上海数据模型一二三四五六七八九十"], np.uint32)
  ends = np.cumsum(rng.integers(200, 2000, 2000))
  text = chars[rng.integers(0, len(chars), ends[-1])].tobytes().decode("utf-32-le")
  docs = [text[a:b] for a, b in zip(np.concatenate([[0], ends[:-1]]), ends)]
  cfg = _data_cfg(corpus, "pretrain", train=_write_jsonl(tmp_path / "big.jsonl",
                                                        [{"text": t} for t in docs]),
                  skip_bad_records=False, max_doc_chars=0, seq_len=256, batch_size=8)
  d = str(tmp_path / "store")
  store_build.prepare(_Config(cfg), d, workers=1, shard_records=1000, quiet=True)
  store_size = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(d) for n in ns)
  assert store_size > 5 << 20
  cfg.train = f"tokens:{d}"
  peaks = {}
  for budget in (512 << 10, 1 << 40):
    store = store_lib.Store(d)
    it = store_batches.StoreIterator(store, cfg, corpus["tok"], seed=0, release_bytes=budget)
    before_release = []  # the peaks: resident store pages just before each release
    real = store.release
    def release(real=real, calls=[]):  # pylint: disable=dangerous-default-value
      calls.append(1)
      if len(calls) % 8 == 1:  # reading smaps costs tens of ms here
        before_release.append(resident.mapped_kib(d))
      real()
    store.release = release
    for _ in range(150):
      next(it)
    peaks[budget] = max(before_release + [resident.mapped_kib(d)])
    assert (len(before_release) > 10) == (budget < store_size), before_release
  # Past the budget by at most one batch: 8 rows of a piece or two and their records; the
  # whole store (9 MB) is read without releases.
  assert peaks[512 << 10] <= 2048, peaks
  assert peaks[1 << 40] > 4096, peaks


def _store_bytes(d):
  out = {}
  for root, _, names in os.walk(d):
    for n in names:
      if n.endswith((".tokens", ".npy", ".weights")):
        with open(os.path.join(root, n), "rb") as f:
          out[os.path.relpath(os.path.join(root, n), d)] = f.read()
  return out


def test_prepare_resumes_is_a_no_op_when_unchanged_and_refuses_changes(corpus, stores, tmp_path):
  cfg = _Config(_data_cfg(corpus, "sft"))
  d = str(tmp_path / "store")
  # An interrupted prepare: some shards finished, one half-written, no manifest yet.
  store_build.prepare(cfg, d, workers=1, shard_records=9, quiet=True)
  os.remove(os.path.join(d, store_lib.MANIFEST))
  for k, i in ((0, 3), (1, 0)):
    p = store_lib.shard_paths(d, k, i)
    os.remove(p["meta"])
    with open(p["tokens"], "r+b") as f:
      f.truncate(7)
  with pytest.raises(store_lib.StoreError, match="unfinished .*run the same prepare command"):
    pipeline.make_train_iterator(_data_cfg(corpus, "sft", train=d), corpus["tok"], seed=0)
  report = store_build.prepare(cfg, d, workers=2, shard_records=9, quiet=True)
  assert (report.shards_kept, report.shards_written) == (11, 2)
  assert _store_bytes(d) == _store_bytes(stores["sft"])  # as if never interrupted
  again = store_build.prepare(cfg, d, workers=2, shard_records=9, quiet=True)
  assert again.up_to_date and again.shards_written == 0

  other_tok = tok_lib.train_sentencepiece(_docs(100, 9, 20), vocab_size=320)
  other_tok.save(str(tmp_path / "tok2"))
  cfg2 = _Config(_data_cfg(corpus, "sft", tokenizer=dict(
      path=str(tmp_path / "tok2" / tok_lib.MODEL_FILE))))
  with pytest.raises(store_lib.StoreError, match="the tokenizer differs.*--rebuild"):
    store_build.prepare(cfg2, d, shard_records=9, quiet=True)
  # Training with another tokenizer than the store's is refused too.
  with pytest.raises(store_lib.StoreError, match="not the tokenizer the store"):
    pipeline.make_train_iterator(_data_cfg(corpus, "sft", train=d), other_tok, seed=0)
  with pytest.raises(store_lib.StoreError, match="clean_text=True.*prepared with"):
    pipeline.make_train_iterator(_data_cfg(corpus, "sft", train=d, clean_text=True),
                                 corpus["tok"], seed=0)

  with open(corpus["chat"], "a", encoding="utf-8") as f:  # the source grows
    f.write(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "yo"}]}) + "\n")
  try:
    with pytest.raises(store_lib.StoreError, match="chat.jsonl changed"):
      store_build.prepare(cfg, d, shard_records=9, quiet=True)
    rebuilt = store_build.prepare(cfg, d, shard_records=9, rebuild=True, quiet=True)
    assert rebuilt.records == 70 + 1 + 41 and not rebuilt.up_to_date
  finally:
    lines = open(corpus["chat"], encoding="utf-8").read().splitlines(keepends=True)
    open(corpus["chat"], "w", encoding="utf-8").write("".join(lines[:-1]))

  # A damaged shard of a finished store is refused, never read.
  with open(store_lib.shard_paths(d, 0, 0)["tokens"], "r+b") as f:
    f.truncate(3)
  with pytest.raises(store_lib.StoreError, match="damaged"):
    store_lib.Store(d)


def test_a_bad_record_is_named_and_leaves_no_store(corpus, tmp_path):
  cfg = _Config(_data_cfg(corpus, "pretrain", train=corpus["text"], skip_bad_records=False))
  d = str(tmp_path / "store")
  with pytest.raises(ValueError, match=r"text\.jsonl:5: malformed JSON"):
    store_build.prepare(cfg, d, workers=2, shard_records=9, quiet=True)
  assert not os.path.exists(os.path.join(d, store_lib.MANIFEST))
  with pytest.raises(store_lib.StoreError, match="unfinished"):
    store_lib.Store(d)
  cfg.data.skip_bad_records = True
  report = store_build.prepare(cfg, d, workers=2, shard_records=9, quiet=True)
  manifest = store_lib.read_manifest(d)
  assert report.skipped_records == 1 == manifest["totals"]["skipped"]
  assert "text.jsonl:5" in manifest["sources"][0]["skipped_examples"][0]


@pytest.mark.slow
def test_kill_9_then_resume_gives_bit_identical_parameters(tmp_path):
  """Training from a store, killed with SIGKILL after its checkpoint of step 10, resumed by the
  same command: the batches and the final parameters equal an uninterrupted run's."""
  import signal
  import subprocess
  import sys
  import jax
  from llm_jax import checkpoint, rundir
  from llm_jax.train import loop
  from tests.store_resume_worker import store_config
  from tests.test_loop import small_config
  tok_dir = str(tmp_path / "tok")
  cfg = small_config("")
  tok_lib.get_tokenizer(cfg.data.tokenizer, tok_dir, lambda: pipeline.corpus_texts(cfg.data))
  tokenizer = os.path.join(tok_dir, tok_lib.MODEL_FILE)
  store = str(tmp_path / "store")
  store_build.prepare(_Config(small_config(tokenizer).data), store, workers=2, shard_records=400,
                      quiet=True)

  def recorder(seen):
    return lambda step, batch: seen.append((step, {k: v.copy() for k, v in batch.items()}))

  seen_a, seen_b = [], []
  loop.train_and_evaluate(store_config(tokenizer, store), str(tmp_path / "a"),
                          batch_hook=recorder(seen_a))
  b = str(tmp_path / "b")
  proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__),
                                                        "store_resume_worker.py"),
                           b, tokenizer, store], stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "STALLED"
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL and checkpoint.steps(b)[-1] == 10
  result = loop.train_and_evaluate(store_config(tokenizer, store), b, batch_hook=recorder(seen_b))
  assert result["step"] == 20 and [s for s, _ in seen_b] == list(range(10, 20))
  for (_, x), (_, y) in zip(seen_a[10:], seen_b):
    for k in KEYS:
      np.testing.assert_array_equal(x[k], y[k])
  pa, _ = rundir.load_params(str(tmp_path / "a"), 20)
  pb, _ = rundir.load_params(b, 20)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(x, y)
