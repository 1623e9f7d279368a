"""Packed batches from a token store: the same batches as the on-the-fly pipeline for the same
documents and seed, where the batch at step s is a pure function of (seed, s).

  record stream   position i -> (source, record): Grain's own stateless permutation (the
                  per-epoch `index_shuffle` of MapDataset.shuffle(seed + k).repeat()) and, for
                  several sources, its weighted mixture: the order the on-the-fly pipeline reads
  examples        each record's sequences cut as pipeline.ToExamples cuts them (seq_len,
                  pretrain split / SFT truncation and drop), as (sequence, start, end) spans
  row plan        Grain's packers replayed on span lengths alone (concat-then-split with its
                  full-length pass-through; first/best-fit with their flushes and seeded bin
                  shuffles; none): global row g -> its pieces
  batch           the rows of this process's slice of global batch s, read from the memmap

Resuming needs only the step: the plan is replayed from the start over lengths (no token is
read), and only this process's rows are ever read. The packers are replicas, so the exactness
test (tests/test_data_store.py) compares them with Grain's on every packing mode.
"""

from __future__ import annotations

import json
import time

from absl import logging
import numpy as np

from llm_jax.data import packing as packing_lib
from llm_jax.data import sources
from llm_jax.data import store as store_lib

# Grain's stateless permutation and mixture selection, read directly: through MapDataset they
# cost ~45 us (shuffle) and ~240 us (mix) per element. Kept here, the one place a rename in
# Grain would break; the exactness tests compare this stream with Grain's pipeline.
from grain._src.python.experimental.index_shuffle.python import (  # pylint: disable=g-bad-import-order
    index_shuffle_module as _index_shuffle)
from grain._src.python.dataset.transformations import mix as _grain_mix


class RecordStream:
  """Position i of the shuffled, repeated (and mixed) record stream -> (source, record)."""

  def __init__(self, lengths: list[int], weights: list[float], seed: int):
    self._lengths, self._seeds = lengths, [seed + k for k in range(len(lengths))]
    self._proportions = (None if len(lengths) == 1 else
                         tuple(_grain_mix._float_to_int_proportions(weights)))  # pylint: disable=protected-access

  def _shuffled(self, k: int, i: int) -> int:
    n = self._lengths[k]
    epoch, j = divmod(i, n)
    return _index_shuffle.index_shuffle(j, n - 1, (self._seeds[k] + epoch) % 2**32, 4)

  def __getitem__(self, i: int) -> tuple[int, int]:
    if self._proportions is None:
      return 0, self._shuffled(0, i)
    k, j = _grain_mix._dataset_and_key_of_next_element(i, self._proportions)  # pylint: disable=protected-access
    return k, self._shuffled(k, j)


class _Examples:
  """The example stream: (shard, token start, input start, input end) per example, in the order
  ToExamples yields them for the record stream (lengths only: no token is read, except the
  loss weights of an SFT sequence longer than seq_len, to see whether truncation leaves any)."""

  def __init__(self, store: store_lib.Store, stream: RecordStream, seq_len: int, mode: str,
               split_long: bool):
    self._store, self._stream = store, stream
    self._seq_len, self._mode, self._split = seq_len, mode, split_long
    self.counters = sources.Counters()  # logged as the on-the-fly pipeline logs them

  def __call__(self):
    size = self._seq_len
    i = 0
    while True:
      k, r = self._stream[i]
      i += 1
      for shard, s, e in self._store.sources[k].sequences(r):
        n = e - s - 1  # inputs = ids[:-1]
        if n < 1:
          self.counters.add("examples too short to train on (< 2 tokens) dropped", f"{n + 1}")
          continue
        if n <= size:
          yield shard, s, 0, n
        elif self._mode == "pretrain":
          if not self._split:
            yield shard, s, 0, n
          else:
            for a in range(0, n, size):
              yield shard, s, a, min(a + size, n)
        elif shard.weights is not None and not shard.weights[s + 1:s + 1 + size].any():
          self.counters.add("truncated SFT examples left with no assistant token, dropped",
                            f"{n} tokens, first trained token beyond {size}")
        else:
          yield shard, s, 0, size


def _concat_then_split(examples, seq_len: int):
  """grain.experimental.ConcatThenSplitIterDataset (its default split_full_length_features=True)
  on spans: the examples back to back, cut every seq_len tokens; a piece continued from the
  previous row starts again at position 0. Yields rows as lists of pieces (shard, start, a, b)."""
  piece = None
  while True:
    row, fill = [], 0
    while fill < seq_len:
      if piece is None:
        piece = next(examples)
      shard, s, a, b = piece
      take = min(b - a, seq_len - fill)
      row.append((shard, s, a, a + take))
      fill += take
      piece = (shard, s, a + take, b) if a + take < b else None
    yield row


def _fit_pack(examples, seq_len: int, num_bins: int, seed: int, best: bool, shuffle: bool):
  """grain.experimental.FirstFit/BestFitPackIterDataset on spans: bins filled until an example
  fits none, then all emitted (in an order shuffled with seed + rows emitted so far)."""
  emitted = 0
  ex = next(examples)
  while True:
    fills, rows = [0] * num_bins, [[] for _ in range(num_bins)]
    while True:
      n = ex[3] - ex[2]
      row = -1
      if best:
        best_fill = -1
        for j, f in enumerate(fills):
          if f + n <= seq_len and f > best_fill:
            row, best_fill = j, f
      else:
        for j, f in enumerate(fills):
          if f + n <= seq_len:
            row = j
            break
      if row < 0:
        break
      fills[row] += n
      rows[row].append(ex)
      ex = next(examples)
    used = sum(1 for r in rows if r)
    order = (np.random.default_rng(seed + emitted).permuted(range(used)) if shuffle
             else range(used))
    for j in order:
      yield rows[int(j)]
    emitted += used


def _one_per_row(examples):
  for ex in examples:
    yield [ex]


class RowPlan:
  """Global row g -> its pieces, produced in order; `rows(g, n)` moves forward (a seek back
  replays from row 0)."""

  def __init__(self, make_rows):
    self._make = make_rows
    self._reset()

  def _reset(self):
    self._gen, self._next = self._make(), 0

  def rows(self, start: int, n: int) -> list:
    if start < self._next:
      self._reset()
    while self._next < start:
      next(self._gen)
      self._next += 1
    out = [next(self._gen) for _ in range(n)]
    self._next += n
    return out


class StoreIterator:
  """This process's batches from a token store: dicts of [batch_size // process_count,
  seq_len] arrays, the five-key contract. Its state is the step alone (JSON), which Orbax saves
  with the train state through grain's checkpoint handler."""

  def __init__(self, store: store_lib.Store, data_cfg, tokenizer, *, seed: int,
               process_index: int = 0, process_count: int = 1):
    store.check_compatible(data_cfg, tokenizer)
    if data_cfg.batch_size % process_count:
      raise ValueError(f"config.data.batch_size={data_cfg.batch_size} is not divisible by the "
                       f"{process_count} processes; use a multiple of {process_count}.")
    self._store, self._seed = store, seed
    self._seq_len = data_cfg.seq_len
    self._global = data_cfg.batch_size
    self._local = data_cfg.batch_size // process_count
    self._first_row = process_index * self._local
    self._mode = data_cfg.mode
    packing = packing_lib.resolve_packing(data_cfg.packing, data_cfg.mode)
    lengths = [len(s) for s in store.sources]
    if not all(lengths):
      empty = [s.path for s in store.sources if not len(s)]
      raise store_lib.StoreError(f"{store.directory}: the source(s) {empty} hold no records.")
    stream = RecordStream(lengths, [s.weight for s in store.sources], seed)
    self._examples = _Examples(store, stream, data_cfg.seq_len, data_cfg.mode,
                               split_long=packing != "concat_then_split")
    # The on-the-fly pipeline's bins: 4 x its per-process batch; here the global batch's, so
    # the batches do not depend on how many hosts read them.
    bins = data_cfg.packing_bins or 4 * self._global
    L = data_cfg.seq_len

    def make_rows():
      ex = self._examples()
      if packing == "concat_then_split":
        return _concat_then_split(ex, L)
      if packing in ("first_fit", "best_fit"):
        return _fit_pack(ex, L, bins, seed, best=packing == "best_fit", shuffle=True)
      return _one_per_row(ex)

    self._plan = RowPlan(make_rows)
    self._step = 0
    logging.info("token store %s: %s records, %s tokens (%s); %s packing, rows %d-%d of each "
                 "global batch of %d", store.directory,
                 f"{sum(lengths):,}", f"{store.manifest['totals']['tokens']:,}", store.dtype,
                 packing, self._first_row, self._first_row + self._local - 1, self._global)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    rows = self._plan.rows(self._step * self._global + self._first_row, self._local)
    self._step += 1
    return self._materialize(rows)

  def _materialize(self, rows: list) -> dict:
    L = self._seq_len
    shape = (len(rows), L)
    out = {"inputs": np.zeros(shape, np.int32), "targets": np.zeros(shape, np.int32),
           "loss_weights": np.zeros(shape, np.float32), "segment_ids": np.zeros(shape, np.int32),
           "positions": np.zeros(shape, np.int32)}
    arange = np.arange(L, dtype=np.int32)
    sft = self._mode == "sft"
    for i, row in enumerate(rows):
      at = 0
      for seg, (shard, s, a, b) in enumerate(row, 1):
        n = b - a
        out["inputs"][i, at:at + n] = shard.tokens[s + a:s + b]
        out["targets"][i, at:at + n] = shard.tokens[s + a + 1:s + b + 1]
        if sft and shard.weights is not None:
          out["loss_weights"][i, at:at + n] = shard.weights[s + a + 1:s + b + 1]
        else:
          out["loss_weights"][i, at:at + n] = 1.0
        out["segment_ids"][i, at:at + n] = seg
        out["positions"][i, at:at + n] = arange[:n]
        at += n
    return out

  # The grain checkpoint handler's protocol (an iterator that is not a grain DatasetIterator
  # exchanges its state as bytes).
  def get_state(self) -> bytes:
    return json.dumps({"step": self._step, "seed": self._seed,
                       "store": self._store.fingerprint}).encode()

  def set_state(self, state) -> None:
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    if state.get("store") not in (None, self._store.fingerprint):
      raise store_lib.StoreError(
          f"the checkpoint was written while training from another token store (fingerprint "
          f"{state['store'][:12]}, now {self._store.fingerprint[:12]} in "
          f"{self._store.directory}); resume with the store it was trained on, or start a new "
          "run.")
    self._step = int(state["step"])
    start = time.perf_counter()
    self._plan.rows(self._step * self._global + self._first_row, 0)  # replay the plan now
    logging.info("token store: positioned at step %d (packing replayed in %.1f s)", self._step,
                 time.perf_counter() - start)

  def start_prefetch(self) -> None:
    pass

  def close(self) -> None:
    pass
