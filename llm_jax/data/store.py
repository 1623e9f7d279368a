"""The token store on disk: what `python -m llm_jax.data.prepare` writes and `tokens:DIR` reads.

  DIR/manifest.json          written last, atomically: a store without it is unfinished and
                             refused. Format version, fingerprint, tokenizer (file + sha256),
                             the settings the tokens depend on, token dtype, and per source
                             its files (size, mtime), weight, counts and shards.
  DIR/TOKEN_STORE            written first: names the directory a store (finished or not)
  DIR/tokenizer.model        the tokenizer the tokens were made with (or DIR/tokenizer/ for a
                             tokenizer.json)
  DIR/s<k>/<i>.tokens        flat uint16 (vocab <= 65,536) or uint32 token ids of shard i of
                             source k: every sequence (a document, a document piece, a rendered
                             conversation, each ending with its EOS / <|im_end|>) back to back
  DIR/s<k>/<i>.seqs.npy      int64 [sequences + 1]: where each sequence starts in .tokens
  DIR/s<k>/<i>.recs.npy      int64 [records + 1]: each source record's first sequence (a bad
                             record skipped with skip_bad_records has none, and keeps its place
                             in the shuffle as it does on the fly)
  DIR/s<k>/<i>.weights       uint8 per token, 1 = trained (SFT stores only)
  DIR/s<k>/<i>.json          the shard's counts and fingerprint: written last, so a shard with
                             it is complete (prepare keeps it when resumed)

Every array is read through np.memmap: opening a store of any size costs a few small arrays
per shard, and only the pages a batch touches are read. Mapped pages count in the process's
resident memory until unmapped, so a reader calls `Store.release()` now and then: it drops the
pages of the shards touched since (madvise MADV_DONTNEED; they stay in the page cache), which
keeps a long run over a store of any size at the resident memory of a small one.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import mmap
import os
import tempfile

import numpy as np

FORMAT = "llm_jax.token_store"
VERSION = 1
MANIFEST = "manifest.json"
MARKER = "TOKEN_STORE"  # written first: the directory is a store, finished or not
PREFIX = "tokens:"
# Settings of config.data that change the tokens a record becomes (prepare records them; a
# training config that differs would read other tokens than it asks for).
TOKEN_SETTINGS = ("format", "text_field", "roles", "rename_fields", "tsv_columns", "clean_text",
                  "max_doc_chars", "sentence_ends", "skip_bad_records")


class StoreError(ValueError):
  """A store that is missing, unfinished, damaged or made for other settings; the message names
  the directory and the fix."""


def is_store_spec(path: str) -> bool:
  """`tokens:DIR`, or a directory prepare wrote (finished or not)."""
  return path.startswith(PREFIX) or (os.path.isdir(path) and any(
      os.path.isfile(os.path.join(path, name)) for name in (MANIFEST, MARKER)))


def store_dir(path: str) -> str:
  return path[len(PREFIX):] if path.startswith(PREFIX) else path


def tokenizer_bytes(tok) -> bytes:
  """The bytes that define a tokenizer (the SentencePiece proto, or tokenizer.json)."""
  state = tok.__getstate__()
  data = state.get("proto") or state.get("json")
  return data if isinstance(data, bytes) else data.encode("utf-8")


def tokenizer_hash(tok) -> str:
  return hashlib.sha256(tokenizer_bytes(tok)).hexdigest()


def token_dtype(vocab_size: int) -> str:
  return "uint16" if vocab_size <= 1 << 16 else "uint32"


def atomic_write_json(path: str, obj) -> None:
  """Readers see the old file or the whole new one, never a part (tmp file + rename)."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.chmod(tmp, 0o644)
  os.replace(tmp, path)


def shard_paths(directory: str, source: int, shard: int) -> dict[str, str]:
  base = os.path.join(directory, f"s{source}", f"{shard:05d}")
  return {"tokens": base + ".tokens", "seqs": base + ".seqs.npy", "recs": base + ".recs.npy",
          "weights": base + ".weights", "meta": base + ".json"}


def read_manifest(directory: str) -> dict:
  path = os.path.join(directory, MANIFEST)
  if not os.path.isdir(directory):
    raise StoreError(f"token store {directory!r} does not exist; make it with `python -m "
                     "llm_jax.data.prepare --config=... --out=" + directory + "`.")
  if not os.path.isfile(path):
    raise StoreError(f"token store {directory!r} is unfinished (no {MANIFEST}: prepare was "
                     "interrupted or failed); run the same prepare command again to finish it.")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise StoreError(f"{path}: unreadable ({e}); run prepare again with --rebuild.") from None
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    raise StoreError(f"{path}: not a version-{VERSION} llm_jax token store "
                     f"(format {manifest.get('format')!r}, version {manifest.get('version')!r}); "
                     "prepare it again with this llm_jax.")
  return manifest


class _Shard:
  """One shard's arrays, memory-mapped."""

  def __init__(self, directory: str, source: int, index: int, info: dict, dtype: str,
               weighted: bool):
    p = shard_paths(directory, source, index)
    for key in ("tokens", "seqs", "recs") + (("weights",) if weighted else ()):
      want = info["bytes"][key]
      have = os.path.getsize(p[key]) if os.path.exists(p[key]) else None
      if have != want:
        raise StoreError(f"{p[key]}: {'missing' if have is None else f'{have} bytes'}, the "
                         f"manifest says {want}; the store is damaged: prepare it again with "
                         "--rebuild.")
    n_tokens = info["tokens"]
    self._maps = []  # the mmap objects behind the views, for release()

    def view(m):  # plain ndarray views: np.memmap's own indexing costs microseconds per call
      if getattr(m, "_mmap", None) is not None:  # (np.load maps no empty array)
        self._maps.append(m._mmap)  # pylint: disable=protected-access
      return m.view(np.ndarray)

    self.tokens = (view(np.memmap(p["tokens"], dtype=dtype, mode="r")) if n_tokens
                   else np.zeros(0, dtype))
    self.weights = None
    if weighted:
      self.weights = (view(np.memmap(p["weights"], dtype=np.uint8, mode="r")) if n_tokens
                      else np.zeros(0, np.uint8))
    self.seqs = view(np.load(p["seqs"], mmap_mode="r"))
    self.recs = view(np.load(p["recs"], mmap_mode="r"))

  def release(self) -> None:
    """Unmaps the pages read so far (the next read maps them again from the page cache)."""
    for m in self._maps:
      m.madvise(mmap.MADV_DONTNEED)


class SourceView:
  """Records of one prepared source: record r -> its sequences -> tokens (and weights)."""

  def __init__(self, directory: str, k: int, info: dict, dtype: str, weighted: bool,
               touched: set):
    self.path, self.weight = info["path"], float(info["weight"])
    self._touched = touched  # the store's: shards read since its last release()
    self._shards = [_Shard(directory, k, i, s, dtype, weighted)
                    for i, s in enumerate(info["shards"])]
    self._first = [0]  # each shard's first record
    for s in info["shards"]:
      self._first.append(self._first[-1] + s["records"])
    self.records = self._first[-1]
    self.weighted = weighted

  def __len__(self) -> int:
    return self.records

  def sequences(self, r: int) -> list[tuple[object, int, int]]:
    """[(shard, start, end)] token spans of record r's sequences."""
    i = bisect.bisect_right(self._first, r) - 1
    shard, local = self._shards[i], r - int(self._first[i])
    self._touched.add(shard)
    a, b = int(shard.recs[local]), int(shard.recs[local + 1])
    if b == a + 1:  # the common case: one sequence per record
      return [(shard, int(shard.seqs[a]), int(shard.seqs[b]))]
    bounds = np.asarray(shard.seqs[a:b + 1])
    return [(shard, int(s), int(e)) for s, e in zip(bounds[:-1], bounds[1:])]


class Store:
  """An opened, complete token store."""

  def __init__(self, path: str):
    self.directory = store_dir(path)
    self.manifest = m = read_manifest(self.directory)
    self.dtype = m["dtype"]
    self.weighted = bool(m["weighted"])
    self.touched = set()  # shards read since the last release()
    self.sources = [SourceView(self.directory, k, info, self.dtype, self.weighted,
                               self.touched) for k, info in enumerate(m["sources"])]

  def release(self) -> None:
    """Drops the mapped pages of every shard read since the last call from this process's
    resident memory."""
    for shard in self.touched:
      shard.release()
    self.touched.clear()

  @property
  def fingerprint(self) -> str:
    return self.manifest["fingerprint"]

  def tokenizer_path(self) -> str:
    return os.path.join(self.directory, self.manifest["tokenizer"]["file"])

  def check_compatible(self, data_cfg, tok) -> None:
    """Refuses a training config whose tokenizer or token settings differ from the store's."""
    d = self.directory
    if tokenizer_hash(tok) != self.manifest["tokenizer"]["sha256"]:
      raise StoreError(f"config.data.tokenizer.path={data_cfg.tokenizer.path!r} is not the "
                       f"tokenizer the store {d} was made with ({self.tokenizer_path()}); "
                       "leave config.data.tokenizer.path empty to use the store's, or prepare the "
                       "store again with this tokenizer.")
    for field in TOKEN_SETTINGS:
      want, have = data_cfg[field], self.manifest["settings"][field]
      if want != have:
        raise StoreError(f"config.data.{field}={want!r}, but the store {d} was prepared with "
                         f"{field}={have!r}; drop the override, or prepare a store with it.")
    if data_cfg.mode == "sft" and not self.weighted:
      raise StoreError(f"config.data.mode='sft' needs loss weights, and the store {d} was "
                       "prepared in pretrain mode (no weights); prepare it with "
                       "--config=configs/sft.py (or --config.data.mode=sft).")
    if data_cfg.mode == "dpo":
      raise StoreError(f"config.data.mode='dpo': preference pairs are read on the fly; the "
                       f"token store {d} holds pretraining and SFT data.")
