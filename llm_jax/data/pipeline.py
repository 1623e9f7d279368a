"""The Grain pipeline: sources -> shuffled, repeated, per-process shards -> token examples ->
packed blocks -> per-process numpy batches of the five-key contract.

  MapDataset(records, per source) -> shuffle(seed) -> repeat -> mix(weights) -> shard
    -> IterDataset -> flat_map(normalise, clean, tokenize, split/truncate)
    -> pack (concat-then-split / first-fit / best-fit) -> batch -> [worker processes]

A record is read from disk only when the pipeline reaches it, and each process only reads
the records of its own shard. The iterator is a grain DatasetIterator: `get_state()` /
`set_state()` and Orbax's `grain.checkpoint.CheckpointSave/Restore` resume it exactly.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

from absl import flags
from absl import logging
import grain
import numpy as np

from llm_jax.data import chat_template
from llm_jax.data import formats
from llm_jax.data import packing as packing_lib
from llm_jax.data import preference
from llm_jax.data import sources
from llm_jax.data import builtin
from llm_jax.data import store as store_lib
from llm_jax.data import store_batches
from llm_jax.data import text_clean

MODES = ("pretrain", "sft", "dpo")  # dpo: preference pairs, packed whole (preference.py)


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  path: str
  weight: float


def parse_spec(spec: str, field: str = "config.data.train") -> list[SourceSpec]:
  """"a.jsonl@2,builtin:bios" -> [SourceSpec("a.jsonl", 2.0), SourceSpec("builtin:bios", 1.0)]."""
  out = []
  for item in (s.strip() for s in spec.split(",")):
    if not item:
      continue
    path, at, weight = item.rpartition("@")
    if not at:
      path, weight = item, "1"
    try:
      w = float(weight)
    except ValueError:
      raise ValueError(f"{field}: bad weight {weight!r} in {item!r}; write path@weight, "
                       "e.g. data.jsonl@0.5.") from None
    if w <= 0:
      raise ValueError(f"{field}: weight of {path!r} must be > 0, got {w}.")
    out.append(SourceSpec(path, w))
  if not out:
    raise ValueError(f"{field} is empty; name at least one source (e.g. builtin:bios).")
  return out


class DocReader(grain.sources.RandomAccessDataSource):
  """A record source read lazily and normalised to {"text"} or {"messages"} documents.

  With skip_bad_records, a malformed record comes back as {"error": message} (the tokenize
  step drops and counts it) instead of stopping the job.
  """

  def __init__(self, path: str, data_cfg):
    self.path = path
    if builtin.is_builtin(path):
      self._source = sources.ListSource(path, builtin.records(path, data_cfg.synthetic))
      fmt = "auto"  # built-ins know their own shape; config.data.format is for user files
    else:
      self._source = sources.open_path(path, data_cfg.tfds_data_dir,
                                       strict_utf8=not data_cfg.skip_bad_records,
                                       tsv_columns=data_cfg.get("tsv_columns", ""))
      fmt = data_cfg.format
      for error in sources.encoding_errors(self._source):  # only left open with skip_bad_records
        logging.warning("%s Its lines that are not UTF-8 are skipped (skip_bad_records=True).",
                        error)
    if len(self._source) == 0:
      raise ValueError(f"{path}: the dataset is empty (no records); check the file or remove "
                       "it from the source list.")
    self._text_field = data_cfg.text_field
    self._roles = data_cfg.get("roles", "given")
    if self._roles not in formats.ROLE_MODES:
      raise ValueError(f"config.data.roles={self._roles!r}; use one of {formats.ROLE_MODES}.")
    self._renames = formats.rename_fields(data_cfg.get("rename_fields", ""))
    self._skip = data_cfg.skip_bad_records
    # DPO: every record must be a pair, so a bad one fails on its own line (no detection).
    self.format = ("pair" if data_cfg.mode == "dpo" else
                   fmt if fmt != "auto" else self._detect())

  def _detect(self) -> str:
    errors = []
    for i in range(min(len(self._source), 100)):
      try:
        return formats.detect_format(self._record(i), self._text_field, self._source.where(i))
      except sources.RecordError as e:
        if not self._skip:
          raise
        errors.append(str(e))
    raise sources.RecordError(f"{self.path}: no readable record among the first 100: "
                              f"{errors[:3]}")

  def __len__(self) -> int:
    return len(self._source)

  def _record(self, i: int):
    return formats.apply_renames(self._source[i], self._renames)

  def __getitem__(self, i: int) -> dict:
    try:
      doc = formats.normalize(self._record(i), self.format, self._text_field,
                              self._source.where(i), self._roles)
      doc["where"] = self._source.where(i)  # for errors found later (e.g. no assistant turn)
      return doc
    except sources.RecordError as e:
      if self._skip:
        return {"error": str(e)}
      raise

  def where(self, i: int) -> str:
    return self._source.where(i)


class ToExamples(grain.experimental.FlatMapTransform):
  """One document -> zero or more examples {inputs, targets, loss_weights} of <= seq_len."""

  max_fan_out = 1 << 16

  def __init__(self, data_cfg, tokenizer, packing: str):
    if data_cfg.mode not in MODES:
      raise ValueError(f"config.data.mode={data_cfg.mode!r}; use one of {MODES}.")
    self._tok = tokenizer
    self._mode = data_cfg.mode
    self._seq_len = data_cfg.seq_len
    self._clean = data_cfg.clean_text
    self._max_chars = data_cfg.max_doc_chars
    self._ends = data_cfg.sentence_ends
    self._skip = data_cfg.skip_bad_records
    # Concat-then-split splits long examples itself; other packers need them pre-split.
    self._split_here = packing != "concat_then_split"
    self.counters = sources.Counters()

  def flat_map(self, doc: dict) -> list[dict]:
    if "error" in doc:
      self.counters.add("distinct bad records skipped (skip_bad_records=True)", doc["error"],
                        key=doc["error"])
      return []
    try:
      token_docs = list(self.token_docs(doc))
    except sources.RecordError as e:  # e.g. a chat without an assistant turn
      if not self._skip:
        raise
      self.counters.add("distinct bad records skipped (skip_bad_records=True)", str(e), key=str(e))
      return []
    return [ex for ids, w in token_docs for ex in self._examples(ids, w)]

  def token_docs(self, doc: dict) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(token ids, loss weights) of one normalised document, before length limits (preview.py
    shows these)."""
    if "chosen" in doc:  # a preference pair outside DPO: train on its chosen conversation
      self.counters.add("preference pairs trained on their chosen response (DPO: mode=dpo)",
                        doc["where"])
      doc = {"messages": doc["prompt"] + doc["chosen"], "where": doc["where"]}
    if "messages" in doc:
      ids, w = chat_template.encode_chat(self._tok, doc["messages"], where=doc["where"])
      yield ids, (np.ones_like(w) if self._mode == "pretrain" else w)
      return
    text = text_clean.clean_markup(doc["text"]) if self._clean else doc["text"]
    pieces = text_clean.cut_at_sentences(text, self._max_chars, self._ends)
    if len(pieces) > 1:
      self.counters.add(f"documents cut at sentence ends (max_doc_chars={self._max_chars})",
                        f"{len(text)} chars -> {len(pieces)} pieces")
    for piece in pieces:
      ids = np.asarray(self._tok.encode(piece) + [self._tok.eos_id], np.int32)
      yield ids, np.ones(len(ids), np.float32)

  def _examples(self, ids: np.ndarray, w: np.ndarray) -> list[dict]:
    if len(ids) < 2:
      self.counters.add("examples too short to train on (< 2 tokens) dropped", f"{len(ids)}")
      return []
    inputs, targets, weights = ids[:-1], ids[1:], w[1:]
    n, size = len(inputs), self._seq_len
    if n <= size:
      return [{"inputs": inputs, "targets": targets, "loss_weights": weights}]
    if self._mode == "pretrain":
      self.counters.add(f"documents longer than seq_len={size} split across rows",
                        f"{n} tokens")
      if not self._split_here:
        return [{"inputs": inputs, "targets": targets, "loss_weights": weights}]
      return [{"inputs": inputs[s:s + size], "targets": targets[s:s + size],
               "loss_weights": weights[s:s + size]} for s in range(0, n, size)]
    self.counters.add(f"SFT examples longer than seq_len={size} truncated", f"{n} tokens")
    if not weights[:size].any():
      self.counters.add("truncated SFT examples left with no assistant token, dropped",
                        f"{n} tokens, first trained token beyond {size}")
      return []
    return [{"inputs": inputs[:size], "targets": targets[:size],
             "loss_weights": weights[:size]}]


def _readers(spec: str, data_cfg, field: str) -> list[tuple[DocReader, float]]:
  specs = parse_spec(spec, field)
  stores = [s.path for s in specs if store_lib.is_store_spec(s.path)]
  if stores:
    raise ValueError(f"{field}={spec!r}: {stores[0]!r} is a token store, which only "
                     "config.data.train reads (on its own); name text sources here.")
  return [(DocReader(s.path, data_cfg), s.weight) for s in specs]


def store_spec(spec: str, field: str = "config.data.train") -> str | None:
  """The token store a source spec names (`tokens:DIR` or DIR itself), else None. A store is
  the only source of its spec: its own manifest holds the mixture it was prepared from."""
  specs = parse_spec(spec, field)
  stores = [s for s in specs if store_lib.is_store_spec(s.path)]
  if not stores:
    return None
  if len(specs) > 1 or stores[0].weight != 1.0:
    raise ValueError(f"{field}={spec!r}: a token store is read on its own (prepare a store of "
                     "the whole mixture: its weights come from the config it was prepared "
                     "with).")
  return store_lib.store_dir(stores[0].path)


def _local_batch(data_cfg, process_count: int) -> int:
  if data_cfg.batch_size % process_count:
    raise ValueError(f"config.data.batch_size={data_cfg.batch_size} is not divisible by the "
                     f"{process_count} processes; use a multiple of {process_count}.")
  return data_cfg.batch_size // process_count


def _examples_and_pack(ds: grain.MapDataset, data_cfg, tokenizer, *, seed: int,
                       rows_per_step: int, shuffle_bins: bool) -> grain.IterDataset:
  if data_cfg.mode == "dpo":
    return preference.pairs_and_pack(ds, data_cfg, tokenizer, seed=seed, shuffle_bins=shuffle_bins,
                                     num_bins=data_cfg.packing_bins or 4 * rows_per_step)
  packing = packing_lib.resolve_packing(data_cfg.packing, data_cfg.mode)
  it = grain.experimental.FlatMapIterDataset(ds.to_iter_dataset(),
                                             ToExamples(data_cfg, tokenizer, packing))
  bins = data_cfg.packing_bins or 4 * rows_per_step
  return packing_lib.pack(it, packing, data_cfg.seq_len, num_bins=bins, seed=seed,
                          shuffle_bins=shuffle_bins)


def make_train_iterator(data_cfg, tokenizer, *, seed: int, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """Infinite iterator of this process's batches: dicts of [batch_size // process_count,
  seq_len] numpy arrays (inputs, targets, loss_weights, segment_ids, positions).

  A token store (`tokens:DIR`) gives the batches these sources give on the fly with one
  process, and each process reads its rows of each global batch (store_batches.py)."""
  local_batch = _local_batch(data_cfg, process_count)
  seed = data_cfg.shuffle_seed if data_cfg.shuffle_seed >= 0 else seed
  store = store_spec(data_cfg.train)
  if store is not None:  # tokenized once (data/prepare.py): memory-mapped, stateless order
    return store_batches.StoreIterator(store_lib.Store(store), data_cfg, tokenizer, seed=seed,
                                       process_index=process_index, process_count=process_count)
  readers = _readers(data_cfg.train, data_cfg, "config.data.train")
  # Shuffle before repeat: repeat reseeds each epoch, so every epoch has a new order.
  per_source = [grain.MapDataset.source(r).shuffle(seed + k).repeat()
                for k, (r, _) in enumerate(readers)]
  ds = (per_source[0] if len(per_source) == 1 else
        grain.MapDataset.mix(per_source, [w for _, w in readers]))
  ds = ds[process_index::process_count]  # this process's shard: it reads nothing else
  ds = _examples_and_pack(ds, data_cfg, tokenizer, seed=seed, rows_per_step=local_batch,
                          shuffle_bins=True)
  ds = ds.batch(local_batch, drop_remainder=True, batch_fn=packing_lib.stack_rows)
  if data_cfg.worker_count > 0:
    # Grain's worker processes read absl flags; outside an absl app (tests, notebooks) nobody
    # parsed them, which Grain would treat as an error. Their defaults are what we want.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_cfg.worker_count,
        per_worker_buffer_size=data_cfg.worker_buffer_size))
  return iter(ds)


class _ProcessRows(grain.transforms.Map):
  """A global eval batch (possibly short) -> zero-padded -> this process's rows."""

  def __init__(self, global_batch: int, process_index: int, local_batch: int):
    self._global, self._start, self._local = global_batch, process_index * local_batch, local_batch

  def map(self, batch: dict) -> dict:
    batch = packing_lib.pad_rows(batch, self._global)
    return {k: v[self._start:self._start + self._local] for k, v in batch.items()}


def make_eval_iterator(data_cfg, tokenizer, *, process_index: int = 0,
                       process_count: int = 1) -> grain.DatasetIterator:
  """One deterministic pass over config.data.eval (no shuffle), this process's rows.

  Every process packs the whole eval set (eval sets are small) and takes its rows of each
  global batch: all processes then yield the same number of batches, which multi-host eval
  needs to stay in lockstep. The final global batch is padded with all-zero rows.
  """
  if not data_cfg.eval:
    raise ValueError("config.data.eval is empty: this job has no evaluation data.")
  local_batch = _local_batch(data_cfg, process_count)
  readers = _readers(data_cfg.eval, data_cfg, "config.data.eval")
  ds = grain.MapDataset.source(_Concat([r for r, _ in readers]))
  ds = _examples_and_pack(ds, data_cfg, tokenizer, seed=0, rows_per_step=data_cfg.batch_size,
                          shuffle_bins=False)
  ds = ds.batch(data_cfg.batch_size, drop_remainder=False, batch_fn=packing_lib.stack_rows)
  ds = ds.map(_ProcessRows(data_cfg.batch_size, process_index, local_batch))
  return iter(ds)


class _Concat(grain.sources.RandomAccessDataSource):
  """Eval readers one after another (weights do not matter for a full pass)."""

  def __init__(self, readers: list[DocReader]):
    self._inner = sources.ConcatSource(readers)

  def __len__(self) -> int:
    return len(self._inner)

  def __getitem__(self, i: int) -> dict:
    return self._inner[i]


def corpus_texts(data_cfg, max_records: int | None = None,
                 max_bytes: int | None = None) -> Iterator[str]:
  """Texts of the train sources for tokenizer training: documents as they are, chats as
  ChatML text, within a budget of records and of UTF-8 bytes (config.data.tokenizer's
  train_max_sentences and train_max_bytes unless given), which bounds the memory of the
  sample and of SentencePiece whatever the corpus size. Each source gets its weight's share of
  both, taken from records at an even stride across the whole source (sized from the mean
  record of a probe), visited in a fixed scrambled order where the byte budget may end the
  sample early: it is then spread over the source, never its head only. Logs what each source
  gave."""
  readers = _readers(data_cfg.train, data_cfg, "config.data.train")
  budget = max_records or data_cfg.tokenizer.train_max_sentences
  byte_budget = max_bytes or data_cfg.tokenizer.get("train_max_bytes", 0) or None
  total = sum(w for _, w in readers)
  for reader, weight in readers:
    n = len(reader)
    take = min(n, max(1, int(budget * weight / total)))
    share = None if byte_budget is None else max(1, int(byte_budget * weight / total))
    if share is not None:
      probe = [len(t.encode()) for i in np.linspace(0, n - 1, min(n, 64)).astype(int)
               for t in _texts_of(reader[int(i)], data_cfg)]
      mean = max(1.0, sum(probe) / max(len(probe), 1))
      # 25% more records than the mean says: the byte budget, not the count, ends the sample.
      take = min(take, max(1, int(share / mean * 1.25) + 1))
    positions = np.linspace(0, n - 1, take).round().astype(np.int64) if n else []
    # Visited in a scrambled order when the byte budget may end the sample early (so that it
    # ends spread over the source); in file order when the whole stride is expected to fit.
    scramble = share is not None and mean * take > 0.8 * share
    order = (np.random.default_rng(0).permutation(len(positions)) if scramble
             else range(len(positions)))
    start, got, records = time.perf_counter(), 0, 0
    for q in order:
      for text in _texts_of(reader[int(positions[q])], data_cfg):
        size = len(text.encode())
        if share is not None and got + size > share:
          text = text.encode()[:share - got].decode("utf-8", errors="ignore")
          size = share - got
        got += size
        yield text
      records += 1
      if share is not None and got >= share:
        break
    logging.info("tokenizer sample of %s: %s of %s records (%.1f MB of text%s), read evenly "
                 "over the source in %.1f s", reader.path, f"{records:,}", f"{n:,}", got / 1e6,
                 "" if share is None else f", byte budget {share / 1e6:.1f} MB",
                 time.perf_counter() - start)


def _texts_of(doc: dict, data_cfg) -> list[str]:
  """The text(s) a record gives tokenizer training ([] for a bad record)."""
  if "error" in doc:
    return []
  if "chosen" in doc:
    return [chat_template.render_chat_text(doc["prompt"] + doc["chosen"]),
            chat_template.render_chat_text(doc["prompt"] + doc["rejected"])]
  if "messages" in doc:
    return [chat_template.render_chat_text(doc["messages"])]
  return [text_clean.clean_markup(doc["text"]) if data_cfg.clean_text else doc["text"]]
