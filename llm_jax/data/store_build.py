"""Writing a token store (store.py has the layout): the train sources of a config tokenized once,
in parallel worker processes, shard by shard.

  fingerprint   sha256 of: the tokenizer's bytes, the settings the tokens depend on, per source
                its path and files (size, mtime; for a built-in, its generator settings), the
                shard size and format version
  resume        a shard whose .json carries the fingerprint is complete and kept; the rest are
                (re)written; the manifest comes last, atomically
  up to date    a finished store with the same fingerprint: nothing to do
  changed       a finished store with another fingerprint is refused (naming what changed)
                unless rebuild=True; in an unfinished one, shards of another fingerprint are
                simply written again (none of it was ever usable)
  bad records   a worker stops at the first one and prepare fails with its file:line message;
                with skip_bad_records they are skipped, counted, and kept as empty records
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import multiprocessing
import os
import pickle
import shutil
import sys
import time

import numpy as np

from llm_jax.data import builtin, files, pipeline, sources
from llm_jax.data import store as store_lib
from llm_jax.data import tokenizer as tok_lib


@dataclasses.dataclass
class Report:
  """What prepare did: counts, seconds, and whether it wrote anything."""
  directory: str
  up_to_date: bool
  shards_written: int
  shards_kept: int
  records: int
  tokens: int
  input_bytes: int
  skipped_records: int
  seconds: float


def _source_files(path: str, data_cfg) -> list[dict]:
  if builtin.is_builtin(path):
    return [{"builtin": path, "synthetic": data_cfg.synthetic.to_dict()}]
  if path.startswith("tfds:"):
    return [{"tfds": path}]
  out = []
  for f in files.expand(path):
    st = os.stat(f)
    out.append({"path": os.path.abspath(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
  return out


def _describe_change(old: dict, new: dict) -> str:
  if old["tokenizer"]["sha256"] != new["tokenizer"]["sha256"]:
    return "the tokenizer differs"
  for field in store_lib.TOKEN_SETTINGS + ("mode",):
    if old["settings"].get(field) != new["settings"].get(field):
      return (f"config.data.{field} was {old['settings'].get(field)!r}, now "
              f"{new['settings'].get(field)!r}")
  if [s["path"] for s in old["sources"]] != [s["path"] for s in new["sources"]]:
    return (f"the sources were {[s['path'] for s in old['sources']]}, now "
            f"{[s['path'] for s in new['sources']]}")
  for o, n in zip(old["sources"], new["sources"]):
    if o["files"] != n["files"]:
      for fo, fn in zip(o["files"], n["files"]):
        if fo != fn:
          return (f"{fn['path']} changed (size or modification time)" if "path" in fn else
                  f"{fn.get('builtin') or fn.get('tfds')} changed (its settings)")
      return f"{n['path']} now names {len(n['files'])} files, was {len(o['files'])}"
  return "the shard size or format version differs"


# Worker processes: the readers and tokenizer arrive by fork, re-made through pickling so that no
# file handle is shared with the parent.
_W: dict = {}


def _init_worker(payload: bytes) -> None:
  _W.update(pickle.loads(payload))


def _write_shard(task: tuple) -> dict:
  k, index, first, last = task
  reader, examples = _W["readers"][k], _W["examples"]
  directory, fingerprint, dtype, weighted = (_W["directory"], _W["fingerprint"], _W["dtype"],
                                             _W["weighted"])
  p = store_lib.shard_paths(directory, k, index)
  limit = np.iinfo(dtype).max
  seqs, recs, n_tokens, skipped, bad = [0], [0], 0, 0, []
  tmp = {key: p[key] + ".tmp" for key in ("tokens", "weights")}
  with open(tmp["tokens"], "wb") as ft, open(tmp["weights"], "wb") as fw:
    for r in range(first, last):
      doc = reader[r]
      if "error" in doc:
        skipped += 1
        bad.append(doc["error"])
      else:
        try:
          pieces = list(examples.token_docs(doc))
        except sources.RecordError as e:
          if not _W["skip"]:
            raise
          skipped += 1
          bad.append(str(e))
          pieces = []
        for ids, w in pieces:
          ids = np.asarray(ids)
          if len(ids) and (ids.max() > limit or ids.min() < 0):
            raise ValueError(f"{reader.where(r)}: token id {int(ids.max())} does not fit "
                             f"{dtype}; this is a bug in the tokenizer's vocab size.")
          ft.write(ids.astype(dtype).tobytes())
          if weighted:
            fw.write(np.asarray(w > 0, np.uint8).tobytes())
          n_tokens += len(ids)
          seqs.append(n_tokens)
      recs.append(len(seqs) - 1)
  np.save(p["seqs"], np.asarray(seqs, np.int64))
  np.save(p["recs"], np.asarray(recs, np.int64))
  os.replace(tmp["tokens"], p["tokens"])
  if weighted:
    os.replace(tmp["weights"], p["weights"])
  else:
    os.remove(tmp["weights"])
  meta = {"fingerprint": fingerprint, "first_record": first, "records": last - first,
          "sequences": len(seqs) - 1, "tokens": n_tokens, "skipped": skipped,
          "skipped_examples": bad[:3],
          "bytes": {key: os.path.getsize(p[key])
                    for key in ("tokens", "seqs", "recs") + (("weights",) if weighted else ())}}
  store_lib.atomic_write_json(p["meta"], meta)  # last: the shard is complete
  return meta


def _complete(directory: str, k: int, index: int, fingerprint: str, weighted: bool) -> dict | None:
  p = store_lib.shard_paths(directory, k, index)
  try:
    with open(p["meta"]) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError):
    return None
  if meta.get("fingerprint") != fingerprint:
    return None
  for key, size in meta["bytes"].items():
    if not os.path.exists(p[key]) or os.path.getsize(p[key]) != size:
      return None
  return meta


class _Progress:
  """One line every few seconds: records/s, tokens/s, input MB/s and the time left."""

  def __init__(self, total_records: int, total_bytes: int, every: float = 2.0):
    self.total, self.total_bytes, self.every = total_records, total_bytes, every
    self.records = self.tokens = 0
    self.start = self.last = time.perf_counter()

  def add(self, records: int, tokens: int, force: bool = False) -> None:
    self.records += records
    self.tokens += tokens
    now = time.perf_counter()
    if not force and now - self.last < self.every:
      return
    self.last = now
    dt = max(now - self.start, 1e-9)
    rate = self.records / dt
    left = (self.total - self.records) / rate if rate else float("inf")
    mb = self.total_bytes * self.records / max(self.total, 1) / 1e6
    sys.stderr.write(f"prepare: {self.records:,}/{self.total:,} records "
                     f"({100 * self.records / max(self.total, 1):.0f}%), {rate:,.0f} records/s, "
                     f"{self.tokens / dt:,.0f} tokens/s, {mb / dt:.1f} MB/s, "
                     f"ETA {left:.0f} s\n")
    sys.stderr.flush()


def prepare(config, out: str, *, workers: int = 0, shard_records: int = 10_000,
            rebuild: bool = False, quiet: bool = False) -> Report:
  """Tokenizes config.data.train into a token store at `out` (see the module docstring)."""
  start = time.perf_counter()
  data_cfg = config.data
  if data_cfg.mode == "dpo":
    raise ValueError("config.data.mode='dpo': preference pairs are read on the fly; the token "
                     "store holds pretraining and SFT data.")
  specs = pipeline.parse_spec(data_cfg.train, "config.data.train")
  if any(store_lib.is_store_spec(s.path) for s in specs):
    raise ValueError(f"config.data.train={data_cfg.train!r} is already a token store.")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, store_lib.MARKER), "w") as f:
    f.write("A token store written by `python -m llm_jax.data.prepare`; it is finished when "
            "manifest.json is here.\n")
  # The tokenizer: the config's, or one trained on the corpus and kept in the store (reused by
  # a resumed or repeated prepare, retrained by --rebuild).
  tok_cfg = data_cfg.tokenizer
  kept_tok = os.path.join(out, tok_lib.MODEL_FILE)
  if not tok_cfg.path and os.path.isfile(kept_tok) and not rebuild:
    tok = tok_lib.Tokenizer.load(kept_tok)
  else:
    tok = tok_lib.get_tokenizer(tok_cfg, None, lambda: pipeline.corpus_texts(data_cfg))
  sentencepiece = isinstance(tok, tok_lib.Tokenizer)
  tok_rel = tok_lib.MODEL_FILE if sentencepiece else os.path.join("tokenizer", "tokenizer.json")
  dtype = store_lib.token_dtype(tok.vocab_size)
  weighted = data_cfg.mode == "sft"
  settings = {f: data_cfg[f] for f in store_lib.TOKEN_SETTINGS}
  settings["mode"] = data_cfg.mode
  src_info = [{"path": s.path, "weight": s.weight, "files": _source_files(s.path, data_cfg)}
              for s in specs]
  key = {"version": store_lib.VERSION, "tokenizer": store_lib.tokenizer_hash(tok),
         "settings": settings, "dtype": dtype, "shard_records": shard_records,
         "sources": [{"path": s["path"], "files": s["files"]} for s in src_info]}
  fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
  new = {"tokenizer": {"sha256": key["tokenizer"]}, "settings": settings, "sources": src_info}

  manifest_path = os.path.join(out, store_lib.MANIFEST)
  if os.path.isfile(manifest_path):
    old = store_lib.read_manifest(out)
    if old["fingerprint"] == fingerprint:
      if [s["weight"] for s in old["sources"]] != [s["weight"] for s in src_info]:
        for o, s in zip(old["sources"], src_info):
          o["weight"] = s["weight"]
        store_lib.atomic_write_json(manifest_path, old)
      if not quiet:
        print(f"{out}: up to date ({old['totals']['records']:,} records, "
              f"{old['totals']['tokens']:,} tokens); nothing to do.")
      t = old["totals"]
      return Report(out, True, 0, sum(len(s["shards"]) for s in old["sources"]), t["records"],
                    t["tokens"], 0, t["skipped"], time.perf_counter() - start)
    if not rebuild:
      raise store_lib.StoreError(
          f"{out} holds a token store made from other inputs: {_describe_change(old, new)}. "
          "Pass --rebuild to replace it, or choose another --out.")
    os.remove(manifest_path)  # from here on the directory is an unfinished store
  if rebuild:
    for name in os.listdir(out):
      if name[:1] == "s" and name[1:].isdigit():
        shutil.rmtree(os.path.join(out, name))
  tok.save(out if sentencepiece else os.path.join(out, "tokenizer"))

  readers = [pipeline.DocReader(s.path, data_cfg) for s in specs]
  examples = pipeline.ToExamples(data_cfg, tok, "concat_then_split")
  tasks, kept = [], []
  for k, reader in enumerate(readers):
    os.makedirs(os.path.join(out, f"s{k}"), exist_ok=True)
    n = len(reader)
    for index, first in enumerate(range(0, n, shard_records)):
      meta = _complete(out, k, index, fingerprint, weighted)
      if meta is not None:
        kept.append(meta)
      else:
        tasks.append((k, index, first, min(first + shard_records, n)))
  total_records = sum(len(r) for r in readers)
  total_bytes = sum(f.get("size", 0) for s in src_info for f in s["files"])
  progress = _Progress(total_records, total_bytes, every=1e9 if quiet else 2.0)
  progress.add(sum(m["records"] for m in kept), sum(m["tokens"] for m in kept),
               force=bool(kept) and not quiet)
  if kept and not quiet:
    print(f"{out}: resuming: {len(kept)} finished shard(s) kept, {len(tasks)} to write.")
  payload = pickle.dumps({"readers": readers, "examples": examples, "directory": out,
                          "fingerprint": fingerprint, "dtype": dtype, "weighted": weighted,
                          "skip": data_cfg.skip_bad_records})
  done = []
  workers = workers or min(os.cpu_count() or 1, max(len(tasks), 1))
  if workers <= 1 or len(tasks) <= 1:
    _init_worker(payload)
    for task in tasks:
      done.append(_write_shard(task))
      progress.add(done[-1]["records"], done[-1]["tokens"])
  else:
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(payload,)) as pool:
      for meta in pool.imap_unordered(_write_shard, tasks):
        done.append(meta)
        progress.add(meta["records"], meta["tokens"])
  progress.add(0, 0, force=not quiet)

  shards = [[None] * -(-len(r) // shard_records) for r in readers]
  for k, reader in enumerate(readers):
    for index in range(len(shards[k])):
      shards[k][index] = _complete(out, k, index, fingerprint, weighted)
      if shards[k][index] is None:
        raise store_lib.StoreError(f"{out}: shard {index} of source {k} is missing after "
                                   "prepare; run it again.")
  sources_out = []
  for k, (info, reader) in enumerate(zip(src_info, readers)):
    sh = shards[k]
    sources_out.append({**info, "records": len(reader),
                        "sequences": sum(m["sequences"] for m in sh),
                        "tokens": sum(m["tokens"] for m in sh),
                        "skipped": sum(m["skipped"] for m in sh),
                        "skipped_examples": [e for m in sh for e in m["skipped_examples"]][:3],
                        "shards": [{k2: m[k2] for k2 in ("records", "sequences", "tokens",
                                                         "bytes")} for m in sh]})
  totals = {f: sum(s[f] for s in sources_out) for f in ("records", "sequences", "tokens",
                                                        "skipped")}
  seconds = time.perf_counter() - start
  manifest = {"format": store_lib.FORMAT, "version": store_lib.VERSION,
              "fingerprint": fingerprint, "dtype": dtype, "weighted": weighted,
              "tokenizer": {"file": tok_rel, "sha256": key["tokenizer"],
                            "vocab_size": tok.vocab_size},
              "settings": settings, "shard_records": shard_records, "sources": sources_out,
              "totals": totals,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "prepare_seconds": round(seconds, 2)}
  store_lib.atomic_write_json(manifest_path, manifest)  # last: now training accepts the store
  written_records = sum(m["records"] for m in done)
  if not quiet:
    print(f"wrote {out}: {totals['records']:,} records, {totals['sequences']:,} sequences, "
          f"{totals['tokens']:,} tokens ({dtype}) in {seconds:.1f} s"
          + (f"; {totals['skipped']:,} bad records skipped (skip_bad_records), e.g. "
             f"{sources_out[0]['skipped_examples'][:1]}" if totals["skipped"] else ""))
  return Report(out, False, len(done), len(kept), totals["records"], totals["tokens"],
                int(total_bytes * written_records / max(total_records, 1)), totals["skipped"],
                seconds)
