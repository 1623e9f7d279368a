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
read), and only this process's rows are ever read. The saved state adds a snapshot of the
packer at the start of the next batch (a few integers: the next example's cursor, the tokens an
open row took of it, the rows emitted so far), so a resumed run starts there in constant time
whatever the step. The packers are replicas, so the exactness test (tests/test_data_store.py)
compares them with Grain's on every packing mode.
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
  loss weights of an SFT sequence longer than seq_len, to see whether truncation leaves any).

  An example's cursor is (record position i, j): the j-th example record i yields. `stream`
  starts at any cursor, so a resumed plan reads only the records from its snapshot on."""

  def __init__(self, store: store_lib.Store, stream: RecordStream, seq_len: int, mode: str,
               split_long: bool):
    self._store, self._stream = store, stream
    self._seq_len, self._mode, self._split = seq_len, mode, split_long
    self.counters = sources.Counters()  # logged as the on-the-fly pipeline logs them
    self.at = (0, -1)  # cursor of the example yielded last
    self.records_read = 0  # records looked up (how far a resume had to replay)

  def next_cursor(self) -> tuple[int, int]:
    return self.at[0], self.at[1] + 1

  def _of_record(self, i: int):
    size = self._seq_len
    k, r = self._stream[i]
    self.records_read += 1
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

  def stream(self, i: int = 0, j: int = 0):
    """Examples from cursor (i, j) on (j past record i's last example: record i + 1's first)."""
    self.at = (i, j - 1)
    while True:
      for jj, ex in enumerate(self._of_record(i)):
        if jj >= j:
          self.at = (i, jj)
          yield ex
      i, j = i + 1, 0


# A snapshot is the packer's whole state at a row boundary: the cursor of the next example to
# read, how many of its input tokens an open row already took (concat-then-split), and how many
# rows were emitted before (the seed of fit packing's bin shuffle). A few integers, whatever the
# step: the iterator's saved state, from which a resumed run replays at most one flush of bins.
START = {"record": 0, "example": 0, "offset": None, "emitted": 0}


def _snapshot(cursor, offset=None, emitted=0) -> dict:
  return {"record": int(cursor[0]), "example": int(cursor[1]),
          "offset": None if offset is None else int(offset), "emitted": int(emitted)}


def _concat_then_split(examples: _Examples, seq_len: int, snap: dict):
  """grain.experimental.ConcatThenSplitIterDataset (its default split_full_length_features=True)
  on spans: the examples back to back, cut every seq_len tokens; a piece continued from the
  previous row starts again at position 0. Yields (row, snapshot after it), rows as lists of
  pieces (shard, start, a, b); every row ends at a boundary."""
  it = examples.stream(snap["record"], snap["example"])
  piece = None
  if snap["offset"] is not None:  # the open row's example, its first tokens already taken
    shard, s, _, b = next(it)
    piece = (shard, s, snap["offset"], b)
  while True:
    row, fill = [], 0
    while fill < seq_len:
      if piece is None:
        piece = next(it)
      shard, s, a, b = piece
      take = min(b - a, seq_len - fill)
      row.append((shard, s, a, a + take))
      fill += take
      piece = (shard, s, a + take, b) if a + take < b else None
    yield row, (_snapshot(examples.next_cursor()) if piece is None else
                _snapshot(examples.at, piece[2]))


def _fit_pack(examples: _Examples, seq_len: int, num_bins: int, seed: int, best: bool,
              shuffle: bool, snap: dict):
  """grain.experimental.FirstFit/BestFitPackIterDataset on spans: bins filled until an example
  fits none, then all emitted (in an order shuffled with seed + rows emitted so far). The
  boundaries are the flushes: the snapshot follows a flush's last row."""
  it = examples.stream(snap["record"], snap["example"])
  emitted = snap["emitted"]
  ex = next(it)
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
      ex = next(it)
    used = sum(1 for r in rows if r)
    order = (np.random.default_rng(seed + emitted).permuted(range(used)) if shuffle
             else range(used))
    emitted += used
    for q, j in enumerate(order, 1):
      yield rows[int(j)], (_snapshot(examples.at, None, emitted) if q == used else None)


def _one_per_row(examples: _Examples, snap: dict):
  for ex in examples.stream(snap["record"], snap["example"]):
    yield [ex], _snapshot(examples.next_cursor())


class RowPlan:
  """Global row g -> its pieces, produced in order; `rows(g, n)` moves forward. It keeps the
  snapshot of the last boundary it passed: `state()` is that snapshot and its row, `restore`
  starts there (a seek back restarts from the snapshot, or from row 0 if it is further)."""

  def __init__(self, make_rows):
    self._make = make_rows
    self._restart(0, dict(START))

  def _restart(self, row: int, snap: dict):
    self._gen, self._next = self._make(snap), row
    self._snap_row, self._snap = row, snap

  def _pull(self) -> list:
    row, after = next(self._gen)
    self._next += 1
    if after is not None:
      self._snap_row, self._snap = self._next, after
    return row

  def rows(self, start: int, n: int) -> list:
    if start < self._next:
      if start >= self._snap_row:
        self._restart(self._snap_row, self._snap)
      else:
        self._restart(0, dict(START))
    while self._next < start:
      self._pull()
    return [self._pull() for _ in range(n)]

  def state(self) -> dict:
    return {"row": self._snap_row, **self._snap}

  def restore(self, state: dict) -> None:
    self._restart(int(state["row"]), {k: state[k] for k in START})


# Reading maps up to 64 KiB around each page it faults (the kernel's fault-around), so a
# piece of a row or a record's offsets count as their bytes plus two such windows.
_WINDOW = 2 * 64 * 1024
# Mapped store pages are released after about this many bytes were read through the maps: the
# resident memory a store adds, whatever its size.
RELEASE_BYTES = 32 << 20


class StoreIterator:
  """This process's batches from a token store: dicts of [batch_size // process_count,
  seq_len] arrays, the five-key contract. Its state (JSON, a few hundred bytes) is the step and
  the packer's snapshot, which Orbax saves with the train state through grain's checkpoint
  handler; the step alone resumes it too, more slowly."""

  def __init__(self, store: store_lib.Store, data_cfg, tokenizer, *, seed: int,
               process_index: int = 0, process_count: int = 1,
               release_bytes: int = RELEASE_BYTES):
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

    def make_rows(snap):
      if packing == "concat_then_split":
        return _concat_then_split(self._examples, L, snap)
      if packing in ("first_fit", "best_fit"):
        return _fit_pack(self._examples, L, bins, seed, best=packing == "best_fit",
                         shuffle=True, snap=snap)
      return _one_per_row(self._examples, snap)

    # What a saved plan snapshot depends on besides the store and the seed.
    self._plan_key = [packing, data_cfg.seq_len, data_cfg.mode, bins]
    self._plan = RowPlan(make_rows)
    self._step = 0
    self._release_bytes, self._mapped, self._records_seen = release_bytes, 0, 0
    logging.info("token store %s: %s records, %s tokens (%s); %s packing, rows %d-%d of each "
                 "global batch of %d", store.directory,
                 f"{sum(lengths):,}", f"{store.manifest['totals']['tokens']:,}", store.dtype,
                 packing, self._first_row, self._first_row + self._local - 1, self._global)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    rows = self._plan.rows(self._step * self._global + self._first_row, self._local)
    self._step += 1
    batch = self._materialize(rows)
    records = self._examples.records_read
    self._mapped += (records - self._records_seen) * 2 * _WINDOW  # .recs and .seqs
    self._records_seen = records
    if self._mapped >= self._release_bytes:
      self._store.release()
      self._mapped = 0
    return batch

  def _materialize(self, rows: list) -> dict:
    L = self._seq_len
    shape = (len(rows), L)
    out = {"inputs": np.zeros(shape, np.int32), "targets": np.zeros(shape, np.int32),
           "loss_weights": np.zeros(shape, np.float32), "segment_ids": np.zeros(shape, np.int32),
           "positions": np.zeros(shape, np.int32)}
    arange = np.arange(L, dtype=np.int32)
    sft = self._mode == "sft"
    touched, mapped = self._store.touched, 0
    per_token = np.dtype(self._store.dtype).itemsize + (1 if sft else 0)
    for i, row in enumerate(rows):
      at = 0
      for seg, (shard, s, a, b) in enumerate(row, 1):
        n = b - a
        touched.add(shard)  # planned before the last release, maybe
        mapped += (n + 1) * per_token + _WINDOW * (2 if sft else 1)
        out["inputs"][i, at:at + n] = shard.tokens[s + a:s + b]
        out["targets"][i, at:at + n] = shard.tokens[s + a + 1:s + b + 1]
        if sft and shard.weights is not None:
          out["loss_weights"][i, at:at + n] = shard.weights[s + a + 1:s + b + 1]
        else:
          out["loss_weights"][i, at:at + n] = 1.0
        out["segment_ids"][i, at:at + n] = seg
        out["positions"][i, at:at + n] = arange[:n]
        at += n
    self._mapped += mapped
    return out

  # The grain checkpoint handler's protocol (an iterator that is not a grain DatasetIterator
  # exchanges its state as bytes).
  def get_state(self) -> bytes:
    # The plan is moved to the start of the next global batch (its rows are computed from
    # lengths, not read), so that every process saves the same snapshot.
    self._plan.rows(self._step * self._global, 0)
    return json.dumps({"step": self._step, "seed": self._seed,
                       "store": self._store.fingerprint,
                       "plan": {"key": self._plan_key, **self._plan.state()}}).encode()

  def set_state(self, state) -> None:
    """Positions the iterator at state["step"]: from the saved plan snapshot when it is one of
    this configuration's (a replay of at most one flush of bins), else by replaying the plan
    from row 0 (the step alone is enough, at a cost that grows with the step)."""
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    if state.get("store") not in (None, self._store.fingerprint):
      raise store_lib.StoreError(
          f"the checkpoint was written while training from another token store (fingerprint "
          f"{state['store'][:12]}, now {self._store.fingerprint[:12]} in "
          f"{self._store.directory}); resume with the store it was trained on, or start a new "
          "run.")
    self._step = int(state["step"])
    target = self._step * self._global + self._first_row
    plan = state.get("plan")
    usable = (plan is not None and plan.get("key") == self._plan_key and
              state.get("seed", self._seed) == self._seed and int(plan["row"]) <= target)
    start, read = time.perf_counter(), self._examples.records_read
    if usable:
      self._plan.restore(plan)
    self._plan.rows(target, 0)
    logging.info("token store: positioned at step %d %s (%d records looked up in %.2f s)",
                 self._step, "from the saved plan snapshot" if usable else
                 "by replaying the packing plan from row 0", self._examples.records_read - read,
                 time.perf_counter() - start)

  def start_prefetch(self) -> None:
    pass

  def close(self) -> None:
    pass
