"""What a split keeps and drops at config.data.seq_len, counted when a job starts.

SFT examples longer than seq_len are truncated, and dropped when no assistant token is left; DPO
pairs are cut at the end of their responses, and dropped when a side keeps no response token
(preference.cut_pair). During training those events are only logged as they happen; here the
records of each split are tokenized once up front, exactly as training tokenizes them, so the job
can say how many examples it keeps and drops in total, and which seq_len would keep 95% of them.
A split with more than config.data.count_examples records is counted on an even sample of that
many and the totals are scaled (said so). Pretraining drops nothing for length (long documents
are split across rows) and is not counted.
"""

from __future__ import annotations

import math

import numpy as np

from llm_jax.data import pipeline, preference, sources
from llm_jax.data import store as store_lib

SHARE = 0.95  # the share of examples the suggested seq_len keeps


def _sft_needs(ids: np.ndarray, w: np.ndarray) -> tuple[int, int | None]:
  """(length of the example whole, shortest seq_len that keeps a trained token or None)."""
  trained = np.flatnonzero(w[1:] > 0)  # the example's weights are on targets ids[1:]
  return len(ids) - 1, (int(trained[0]) + 1 if len(trained) else None)


def _pair_keep_len(sides) -> int:
  """The shortest seq_len at which the pair is not dropped (cut_pair is monotone in it)."""
  lo, hi = 2, sum(len(ids) - 1 for ids, _ in sides)
  if not preference.cut_pair(sides, hi)[2]:
    return hi + 1  # never: a side has no response token at all (a bad record)
  while lo < hi:
    mid = (lo + hi) // 2
    if preference.cut_pair(sides, mid)[2]:
      hi = mid
    else:
      lo = mid + 1
  return lo


def _quantile_len(needs: list[int]) -> int | None:
  if not needs:
    return None
  return int(sorted(needs)[max(0, math.ceil(SHARE * len(needs)) - 1)])


def count(data_cfg, tokenizer, split: str) -> dict | None:
  """Counts of one split ("train" or "eval") at data_cfg.seq_len, or None when there is nothing
  to count (no such split, pretraining, count_examples=0).

  Keys: records (in the split), counted (records tokenized), examples, kept_whole, cut (kept
  but truncated), dropped (no trained token left), bad_records (skipped, skip_bad_records),
  scaled (the counts are estimates from a sample), seq_len_keep_95 (the shortest seq_len that
  keeps 95% of the examples), seq_len_whole_95 (that fits 95% whole)."""
  spec = data_cfg.train if split == "train" else data_cfg.eval
  budget = int(data_cfg.get("count_examples", 0))
  if not spec or budget <= 0 or data_cfg.mode == "pretrain":
    return None
  seq_len = data_cfg.seq_len
  readers = []
  for s in pipeline.parse_spec(spec, f"config.data.{split}"):
    if store_lib.is_store_spec(s.path):  # its sources, tokenized by prepare with the same code
      store = store_lib.Store(s.path)
      if not store.weighted:
        return None  # a pretraining store: training refuses it for SFT, with its reason
      readers.extend(_StoreRecords(v) for v in store.sources)
    else:
      readers.append(pipeline.DocReader(s.path, data_cfg))
  records = sum(len(r) for r in readers)
  to_examples = pipeline.ToExamples(data_cfg, tokenizer, packing="none")
  whole, keep = [], []  # per example: length whole, shortest seq_len that keeps it
  bad = counted = 0
  for reader in readers:
    take = max(1, round(budget * len(reader) / records)) if records > budget else len(reader)
    for i in np.linspace(0, len(reader) - 1, min(take, len(reader))).round().astype(int):
      counted += 1
      if isinstance(reader, _StoreRecords):
        for n, need in reader.needs(int(i)):
          if n >= 1:
            whole.append(n)
            keep.append(need if need is not None else n + 1)
        continue
      doc = reader[int(i)]
      try:
        if "error" in doc:
          raise sources.RecordError(doc["error"])
        if data_cfg.mode == "dpo":
          if "chosen" not in doc:
            raise sources.RecordError(f"{doc.get('where')}: not a preference pair")
          sides = [preference.encode_side(tokenizer, doc["prompt"], doc[s], doc["where"])
                   for s in ("chosen", "rejected")]
          whole.append(sum(len(ids) - 1 for ids, _ in sides))
          keep.append(_pair_keep_len(sides))
        else:
          for ids, w in to_examples.token_docs(doc):
            n, need = _sft_needs(ids, w)
            if n < 1:
              continue
            whole.append(n)
            keep.append(need if need is not None else n + 1)
      except sources.RecordError:
        if not data_cfg.skip_bad_records:
          raise
        bad += 1
  whole_a, keep_a = np.asarray(whole), np.asarray(keep)
  scale = records / counted if counted else 1.0
  n = len(whole)
  kept_whole = int((whole_a <= seq_len).sum())
  dropped = int((keep_a > seq_len).sum())
  est = lambda x: int(round(x * scale))
  return {
      "split": split, "seq_len": seq_len, "records": records, "counted": counted,
      "scaled": counted < records, "examples": est(n), "kept_whole": est(kept_whole),
      "cut": est(n - kept_whole - dropped), "dropped": est(dropped), "bad_records": est(bad),
      "seq_len_keep_95": _quantile_len(keep), "seq_len_whole_95": _quantile_len(whole),
  }


class _StoreRecords:
  """A token store source's records as the census reads them: each record's sequences are
  the token ids and loss weights ToExamples made of it when the store was prepared."""

  def __init__(self, view: store_lib.SourceView):
    self._view = view

  def __len__(self) -> int:
    return len(self._view)

  def needs(self, r: int) -> list[tuple[int, int | None]]:
    return [_sft_needs(shard.tokens[s:e], shard.weights[s:e])
            for shard, s, e in self._view.sequences(r)]


def describe(c: dict) -> str:
  """One line for the log."""
  est = (f" (estimated from an even sample of {c['counted']:,} of {c['records']:,} records; "
         "config.data.count_examples)" if c["scaled"] else "")
  line = (f"data ({c['split']}): {c['examples']:,} examples at seq_len {c['seq_len']}: "
          f"{c['kept_whole']:,} whole, {c['cut']:,} cut, {c['dropped']:,} dropped (no trained "
          f"token left)" + (f", {c['bad_records']:,} bad records skipped" if c["bad_records"]
                            else "") + est)
  if c["seq_len_keep_95"] is not None:
    line += (f". seq_len {c['seq_len_keep_95']} would keep {SHARE:.0%} of them, "
             f"{c['seq_len_whole_95']} would keep {SHARE:.0%} whole")
  return line + "."
