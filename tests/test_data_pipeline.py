"""Packed blocks against an unpacked reference; resume; per-process shards; eval pass."""

import json
import logging
import random

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import data as data_config
from llm_jax.data import chat_template
from llm_jax.data import pipeline
from llm_jax.data.builtin import bios
from llm_jax.data import tokenizer as tok_lib

WORDS = "alpha beta gamma delta 北京 上海 数据 模型 one two three 🙂".split()
KEYS = {"inputs", "targets", "loss_weights", "segment_ids", "positions"}


def _docs(n, seed, max_words):
  rng = random.Random(seed)
  return [f"doc{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))
          for i in range(n)]


@pytest.fixture(scope="module")
def tok():
  return tok_lib.train_sentencepiece(_docs(200, 0, 30), vocab_size=400)


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                  encoding="utf-8")
  return str(path)


def _cfg(train, **kw):
  cfg = data_config.get_config()
  cfg.train, cfg.seq_len, cfg.batch_size = train, 64, 4
  cfg.synthetic.n_entities = 40
  cfg.update(kw)
  return cfg


def _reference(tok, records, mode):
  """Unpacked (inputs, targets, weights) per document, computed without the pipeline."""
  refs = []
  for r in records:
    if "text" in r:
      ids = np.array(tok.encode(r["text"]) + [tok.eos_id])
      w = np.ones(len(ids))
    else:
      ids, w = chat_template.encode_chat(tok, r["messages"])
      w = np.ones(len(ids)) if mode == "pretrain" else w
    refs.append((ids[:-1], ids[1:], w[1:]))
  return refs


def _check_packed(batch, refs, seq_len, aligned):
  """Every segment is a contiguous slice of exactly one reference document."""
  assert set(batch) == KEYS and all(v.shape == (len(batch["inputs"]), seq_len)
                                    for v in batch.values())
  for row in range(len(batch["inputs"])):
    inp, tgt, w, seg, pos = (batch[k][row] for k in
                             ("inputs", "targets", "loss_weights", "segment_ids", "positions"))
    pad = seg == 0
    assert not inp[pad].any() and not tgt[pad].any() and not w[pad].any()
    for s in np.unique(seg[~pad]):
      idx = np.flatnonzero(seg == s)
      assert (np.diff(idx) == 1).all(), "a segment must be contiguous"
      np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))  # restart at 0
      # Within a segment, each target is the next input: no target crosses a boundary.
      np.testing.assert_array_equal(tgt[idx[:-1]], inp[idx[1:]])
      found = False
      for ref_in, ref_tgt, ref_w in refs:
        starts = range(0, len(ref_in), seq_len) if aligned else range(len(ref_in))
        for o in starts:
          if (len(ref_in) - o >= len(idx) and (ref_in[o:o + len(idx)] == inp[idx]).all()
              and (ref_tgt[o:o + len(idx)] == tgt[idx]).all()):
            np.testing.assert_array_equal(ref_w[o:o + len(idx)], w[idx])
            found = True
            break
        if found:
          break
      assert found, f"row {row} segment {s} is not a slice of any single document"


@pytest.mark.parametrize("mode, packing", [
    ("pretrain", "concat_then_split"), ("pretrain", "first_fit"), ("sft", "best_fit"),
    ("sft", "first_fit"), ("pretrain", "none")])
def test_packed_segments_match_unpacked_documents(tmp_path, tok, mode, packing, caplog):
  records = [{"text": t} for t in _docs(30, 1, 40)]  # some docs are longer than 64 tokens
  records += [{"messages": [{"role": "system", "content": "sys"},
                            {"role": "user", "content": t},
                            {"role": "assistant", "content": t[::-1]}]}
              for t in _docs(15, 2, 12)]
  text_path = _write_jsonl(tmp_path / "text.jsonl", records[:30])
  chat_path = _write_jsonl(tmp_path / "chat.jsonl", records[30:])
  cfg = _cfg(f"{text_path},{chat_path}", mode=mode, packing=packing)
  refs = _reference(tok, records, mode)
  with caplog.at_level(logging.WARNING):
    it = pipeline.make_train_iterator(cfg, tok, seed=3)
    batches = [next(it) for _ in range(12)]
  for batch in batches:
    _check_packed(batch, refs, cfg.seq_len, aligned=(mode == "pretrain" and packing == "first_fit"))
  assert any(b["loss_weights"].any() for b in batches)
  longest = max(len(r[0]) for r in refs)
  assert longest > cfg.seq_len
  event = "split across rows" if mode == "pretrain" else "truncated"
  assert any(event in m for m in caplog.messages), "long documents must be counted in the logs"
  if mode == "sft":  # truncated conversations keep their start
    assert all((b["positions"][b["segment_ids"] > 0] < cfg.seq_len).all() for b in batches)


def test_default_config_yields_contract_batches():
  cfg = data_config.get_config()
  cfg.synthetic.n_entities = 60
  tok = tok_lib.train_sentencepiece(pipeline.corpus_texts(cfg), vocab_size=800)
  batch = next(pipeline.make_train_iterator(cfg, tok, seed=0))
  assert batch["inputs"].shape == (16, 256)
  assert {k: str(v.dtype) for k, v in batch.items()} == {
      "inputs": "int32", "targets": "int32", "loss_weights": "float32",
      "segment_ids": "int32", "positions": "int32"}
  assert (batch["segment_ids"] == 0).mean() < 0.1  # best-fit packing leaves little padding
  weighted = batch["targets"][batch["loss_weights"] > 0]
  assert (weighted == tok.im_end_id).sum() >= 16  # every chat's assistant turns end trained


@pytest.mark.parametrize("mode", ["pretrain", "sft"])
def test_resume_from_state_equals_uninterrupted(tok, mode):
  cfg = _cfg("builtin:bios" if mode == "pretrain" else "builtin:bios_qa_train@2,builtin:bios",
             mode=mode)
  it = pipeline.make_train_iterator(cfg, tok, seed=5)
  for _ in range(3):
    next(it)
  state = it.get_state()
  json.dumps(state)  # checkpointable as JSON
  expected = [next(it) for _ in range(4)]
  restored = pipeline.make_train_iterator(cfg, tok, seed=5)
  restored.set_state(state)
  for want, got in zip(expected, [next(restored) for _ in range(4)]):
    for k in KEYS:
      np.testing.assert_array_equal(want[k], got[k])


def test_resume_through_orbax_checkpoint(tok, tmp_path):
  cfg = _cfg("builtin:bios", mode="pretrain")
  it = pipeline.make_train_iterator(cfg, tok, seed=1)
  for _ in range(2):
    next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
    manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  expected = [next(it) for _ in range(3)]
  restored = pipeline.make_train_iterator(cfg, tok, seed=1)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
    manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  for want in expected:
    got = next(restored)
    np.testing.assert_array_equal(want["inputs"], got["inputs"])


def test_process_shards_are_disjoint_and_cover_the_data(tmp_path, tok):
  texts = [f"doc{i}" for i in range(20)]
  path = _write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
  cfg = _cfg(path, mode="pretrain", packing="none", batch_size=2)
  seen = []
  for index in range(2):
    it = pipeline.make_train_iterator(cfg, tok, seed=7, process_index=index, process_count=2)
    batches = [next(it) for _ in range(10)]  # one epoch: 20 docs / 2 processes, 1 row each
    assert all(b["inputs"].shape == (1, cfg.seq_len) for b in batches)
    seen.append({tok.decode(b["inputs"][0][b["segment_ids"][0] > 0]) for b in batches})
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(texts)
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    pipeline.make_train_iterator(cfg, tok, seed=0, process_index=0, process_count=3)


def test_mixture_follows_weights(tmp_path, tok):
  a = _write_jsonl(tmp_path / "a.jsonl", [{"text": "alpha"}] * 5)
  b = _write_jsonl(tmp_path / "b.jsonl", [{"text": "beta"}] * 5)
  cfg = _cfg(f"{a}@3,{b}@1", mode="pretrain", packing="none")
  it = pipeline.make_train_iterator(cfg, tok, seed=0)
  rows = [tok.decode(r[r > 0]) for _ in range(25) for r in next(it)["inputs"]]
  assert 70 <= rows.count("alpha") <= 80 and rows.count("alpha") + rows.count("beta") == 100


def test_eval_is_one_padded_deterministic_pass_split_over_processes(tok):
  cfg = _cfg("builtin:bios_qa_train", eval="builtin:bios_qa_heldout", batch_size=6, seq_len=512)
  chats = bios.generate(cfg.synthetic)["qa_heldout"]
  full = list(pipeline.make_eval_iterator(cfg, tok))
  again = list(pipeline.make_eval_iterator(cfg, tok))
  assert len(full) == len(again) and all(
      (x["inputs"] == y["inputs"]).all() for x, y in zip(full, again))
  # Each held-out chat appears exactly once; the last batch is padded with all-zero rows.
  n_segments = sum(int(row.max()) for b in full for row in b["segment_ids"])
  assert n_segments == len(chats)
  assert all(b["inputs"].shape == (6, cfg.seq_len) for b in full)
  used = [bool(row.any()) for b in full for row in b["segment_ids"]]
  n_used = sum(used)
  assert n_used % 6 and used == [True] * n_used + [False] * (len(used) - n_used)
  assert len(full) == -(-n_used // 6)
  halves = [list(pipeline.make_eval_iterator(cfg, tok, process_index=i, process_count=2))
            for i in range(2)]
  assert len(halves[0]) == len(halves[1]) == len(full)
  for whole, p0, p1 in zip(full, *halves):
    for k in KEYS:
      np.testing.assert_array_equal(whole[k], np.concatenate([p0[k], p1[k]]))


def test_sentence_cutting_and_cleaning_in_pretraining(tmp_path, tok):
  text = "第一句话。第二句话！Third one? 《书》（）结束。"
  path = _write_jsonl(tmp_path / "d.jsonl", [{"text": text}])
  cfg = _cfg(path, mode="pretrain", packing="none", clean_text=True, max_doc_chars=10)
  rows = [tok.decode(r[r > 0]) for r in next(pipeline.make_train_iterator(cfg, tok, seed=0))
          ["inputs"]]
  # Each row is one piece (its final EOS is only a target); together: the cleaned text.
  assert set(rows) == {"第一句话。第二句话！", "Third one?", "《书》结束。"}


def test_worker_processes_resume(tok):
  cfg = _cfg("builtin:bios", mode="pretrain", worker_count=1)
  it = pipeline.make_train_iterator(cfg, tok, seed=2)
  next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  restored = pipeline.make_train_iterator(cfg, tok, seed=2)
  restored.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(want["inputs"], next(restored)["inputs"])
  it.close()
  restored.close()
