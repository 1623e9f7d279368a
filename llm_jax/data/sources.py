"""Lazy random-access record sources: text lines, JSONL, JSON arrays, Parquet, ArrayRecord, TFDS.

Every source is a grain RandomAccessDataSource (`__len__`, `__getitem__`) that holds only an
index (numpy arrays of byte offsets), never the file's records as Python objects: a record is
read from disk when the pipeline asks for it. `where(i)` names the file and line of record i, for
error messages. Sources are pickled into grain worker processes, so open file handles are
dropped on pickling and reopened on first use.
"""

from __future__ import annotations

import bisect
import codecs
import collections
import json
import mmap
import os
import threading
from typing import Any

import numpy as np
from absl import logging

from llm_jax import packages
from llm_jax.data import files

_CHUNK = 1 << 22  # bytes scanned at once while indexing (bounded memory on large files)
_WHITESPACE = np.array([9, 10, 13, 32], np.uint8)


class RecordError(ValueError):
  """A record a user supplied is malformed; the message names its file and line."""


class Counters:
  """Counts data events and logs them at 1, 2, 4, 8, ... occurrences (never silent, never
  flooding the log). Lives in whichever process runs the transform.

  With `key` (e.g. a bad record's file:line), an event counts once per key: the same bad line met
  again in the next epoch is not a new one."""

  def __init__(self):
    self._counts: dict[str, int] = {}
    self._seen: set[tuple[str, str]] = set()

  def add(self, event: str, detail: str, key: str | None = None) -> None:
    if key is not None:
      if (event, key) in self._seen:
        return
      self._seen.add((event, key))
    n = self._counts.get(event, 0) + 1
    self._counts[event] = n
    if n & (n - 1) == 0:
      logging.warning("data: %s (%d so far). Latest: %s", event, n, detail)

  def get(self, event: str) -> int:
    return self._counts.get(event, 0)


class _FileSource:
  """Byte spans [start, end) of records in one file, read with pread on demand."""

  def __init__(self, path: str, starts: np.ndarray, ends: np.ndarray, lines: np.ndarray):
    self.path, self._starts, self._ends, self._lines = path, starts, ends, lines
    self.shown_path = path  # the name errors use (the .gz a decompressed copy came from)
    self._fd = None
    self._open_lock = threading.Lock()  # Grain's loader threads share the source

  def __len__(self) -> int:
    return len(self._starts)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_fd"] = None
    del state["_open_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open_lock = threading.Lock()

  def _bytes(self, i: int) -> bytes:
    if self._fd is None:
      with self._open_lock:  # one descriptor, however many threads ask first (pread shares it)
        if self._fd is None:
          self._fd = os.open(self.path, os.O_RDONLY)
    start, end = int(self._starts[i]), int(self._ends[i])
    return os.pread(self._fd, end - start, start)

  def where(self, i: int) -> str:
    return f"{self.shown_path}:{int(self._lines[i])}"

  def __del__(self, _close=os.close):  # os itself may be gone when the interpreter exits
    if getattr(self, "_fd", None) is not None:
      _close(self._fd)


def _open_memmap(path: str) -> np.ndarray:
  if not os.path.exists(path):
    raise FileNotFoundError(f"data file {path!r} does not exist (check config.data.train/eval).")
  if os.path.getsize(path) == 0:
    return np.zeros((0,), np.uint8)
  return np.memmap(path, dtype=np.uint8, mode="r")


def _unmap_scanned(mm: np.ndarray, start: int) -> None:
  """Drops the pages of a scanned chunk from this process (they stay in the page cache): a
  memory-mapped page counts in resident memory until unmapped, so indexing a 2 GB file would
  otherwise hold 2 GB resident until the scan ends."""
  m = getattr(mm, "_mmap", None)
  if m is not None and start < len(m):
    aligned = start - start % mmap.PAGESIZE  # madvise takes page-aligned starts
    m.madvise(mmap.MADV_DONTNEED, aligned, min(start + _CHUNK, len(m)) - aligned)


_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark (Windows editors write one): not text


class _Utf8Check:
  """Validates a file's bytes as UTF-8 chunk by chunk while it is indexed, so that a file that
  turns into GBK (or Latin-1...) after the first MiB files.check_utf8 sniffs is named with its
  line, not trained on as replacement characters or met as 'malformed JSON' hours in."""

  def __init__(self, path: str):
    self.path = path
    self.error: str | None = None  # the first problem, "path:line: ..." with the iconv hint
    self._decoder = codecs.getincrementaldecoder("utf-8")()

  def feed(self, chunk: np.ndarray, offset: int, newlines_so_far, final: bool = False) -> None:
    """chunk: the bytes at `offset`; newlines_so_far: arrays of absolute newline offsets."""
    if self.error is not None:
      return
    pending = len(self._decoder.getstate()[0])  # bytes of a character cut by the last chunk
    try:
      self._decoder.decode(chunk.tobytes(), final)
    except UnicodeDecodeError as e:
      at = offset - pending + e.start
      line = 1 + sum(int(np.count_nonzero(a < at)) for a in newlines_so_far)
      bad = e.object[e.start]
      self.error = files.not_utf8_message(self.path, line, bad, at)


def index_lines(path: str, utf8: _Utf8Check | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(starts, ends, 1-based line numbers) of the non-blank lines of a file, without reading it
  into Python objects: newlines and non-whitespace bytes are counted chunk by chunk in numpy.
  A UTF-8 byte order mark at the start is not part of the first line. With `utf8`, the bytes are
  validated on the way."""
  mm = _open_memmap(path)
  size = len(mm)
  bom = size >= 3 and bytes(mm[:3]) == _BOM
  newline_at, nonblank_before_nl, carry = [], [], 0
  for s in range(0, size, _CHUNK):
    chunk = mm[s:s + _CHUNK]
    if s == 0 and bom:
      chunk = np.array(chunk)
      chunk[:3] = 32  # counted as whitespace: a line holding only the mark is blank
    cum = np.cumsum(~np.isin(chunk, _WHITESPACE), dtype=np.int64) + carry
    nl = np.flatnonzero(chunk == 10)
    newline_at.append(nl + s)
    nonblank_before_nl.append(cum[nl])  # the newline itself is whitespace, so cum[nl] is "before"
    carry = int(cum[-1]) if len(cum) else carry
    if utf8 is not None:
      utf8.feed(mm[s:s + _CHUNK], s, newline_at, final=s + _CHUNK >= size)
    _unmap_scanned(mm, s)
  nl = np.concatenate(newline_at) if newline_at else np.zeros((0,), np.int64)
  cum_nl = np.concatenate(nonblank_before_nl) if nonblank_before_nl else np.zeros((0,), np.int64)
  ends = nl
  cum_end = cum_nl
  if size and (len(nl) == 0 or nl[-1] != size - 1):  # last line has no trailing newline
    ends = np.append(ends, size)
    cum_end = np.append(cum_end, carry)
  starts = np.concatenate([[0], nl + 1])[:len(ends)]
  if bom and len(starts):
    starts[0] = 3
  cum_start = np.concatenate([[0], cum_nl])[:len(ends)]
  lines = np.arange(1, len(ends) + 1, dtype=np.int64)
  keep = cum_end > cum_start  # at least one non-whitespace byte
  return starts[keep].astype(np.int64), ends[keep].astype(np.int64), lines[keep]


class TextLineSource(_FileSource):
  """Plain text: each non-blank line is one document."""

  def __init__(self, path: str):
    utf8 = _Utf8Check(path)
    super().__init__(path, *index_lines(path, utf8))
    self.encoding_error = utf8.error

  def __getitem__(self, i: int) -> str:
    raw = self._bytes(i)
    try:
      return raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError as e:
      raise RecordError(_not_utf8(self, i, raw, e)) from None


def _not_utf8(source, i: int, raw: bytes, e: UnicodeDecodeError) -> str:
  return (f"{source.where(i)}: not UTF-8 text (byte 0x{raw[e.start]:02x}); convert the file to "
          "UTF-8, e.g. `iconv -f GBK -t UTF-8 in > out`, or set "
          "config.data.skip_bad_records=True to skip such lines.")


def read_records(path: str, hint: str = "", plain_lines: bool = False):
  """(where, record) for each non-blank line of a small JSON Lines file a user wrote (prompts,
  probes, questions), where = "path:line". Every error is a ValueError naming the file and line;
  `hint` says what a line should look like. plain_lines: a line that is not a JSON object (does
  not start with "{") is yielded as its text, without the newline."""
  try:
    f = open(path, encoding="utf-8-sig")  # a byte order mark is not part of line 1
  except OSError as e:
    raise ValueError(f"{path}: cannot open it ({e.strerror})") from None
  with f:
    for n, line in enumerate(f, 1):
      line = line.rstrip("\n")
      if not line.strip():
        continue
      where = f"{path}:{n}"
      if plain_lines and not line.lstrip().startswith("{"):
        yield where, line
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg}){'; ' + hint if hint else ''}") from None
      if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}"
                         f"{'; ' + hint if hint else ''}")
      yield where, rec


class JsonlSource(_FileSource):
  """JSON Lines: one JSON object per non-blank line; the index is a numpy array of offsets."""

  def __init__(self, path: str):
    utf8 = _Utf8Check(path)
    super().__init__(path, *index_lines(path, utf8))
    self.encoding_error = utf8.error

  def __getitem__(self, i: int) -> Any:
    raw = self._bytes(i)
    try:
      return json.loads(raw)
    except UnicodeDecodeError as e:
      raise RecordError(_not_utf8(self, i, raw, e)) from None
    except json.JSONDecodeError as e:
      raise RecordError(f"{self.where(i)}: malformed JSON ({e}); fix the line or set "
                        "config.data.skip_bad_records=True to skip such lines.") from e


def index_json_array(path: str, utf8: _Utf8Check | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(starts, ends, 1-based line numbers) of the byte spans of the objects of a top-level JSON array `[{...}, {...}]`.

  A vectorised scan: backslash runs decide which quotes are escaped, quote parity which bytes
  are inside strings, and the running bracket depth where each top-level object opens (depth
  1 -> 2) and closes (2 -> 1). State (depth, string parity, trailing backslashes) is carried
  across chunks, so memory is bounded by the chunk size.
  """
  mm = _open_memmap(path)
  starts, ends, lines, newline_at = [], [], [], []
  depth, in_string, bs_run, newlines = 0, 0, 0, 0
  for s in range(0, len(mm), _CHUNK):
    b = np.asarray(mm[s:s + _CHUNK])
    if utf8 is not None:
      newline_at.append(np.flatnonzero(b == 10) + s)
      utf8.feed(b, s, newline_at, final=s + _CHUNK >= len(mm))
    n = len(b)
    idx = np.arange(n)
    is_bs = b == 92
    last_plain = np.maximum.accumulate(np.where(~is_bs, idx, -1 - bs_run))
    prev_plain = np.concatenate([[-1 - bs_run], last_plain[:-1]])
    escaped = ((idx - 1 - prev_plain) % 2) == 1
    quote = (b == 34) & ~escaped
    parity = (np.cumsum(quote, dtype=np.int64) + in_string) % 2
    outside = (parity == 0) & ~quote
    opens = ((b == 123) | (b == 91)) & outside
    closes = ((b == 125) | (b == 93)) & outside
    depth_after = depth + np.cumsum(opens.astype(np.int64) - closes.astype(np.int64))
    local_starts = np.flatnonzero((b == 123) & outside & (depth_after == 2))
    starts.append(local_starts + s)
    cum_newlines = np.cumsum(b == 10, dtype=np.int64) + newlines
    lines.append(cum_newlines[local_starts] + 1)
    newlines = int(cum_newlines[-1])
    ends.append(np.flatnonzero((b == 125) & outside & (depth_after == 1)) + s + 1)
    depth, in_string = int(depth_after[-1]), int(parity[-1])
    bs_run = int(n - 1 - last_plain[-1])
    _unmap_scanned(mm, s)
  starts, ends, lines = (np.concatenate(x).astype(np.int64) if x else np.zeros((0,), np.int64)
                         for x in (starts, ends, lines))
  if depth != 0 or in_string or len(starts) != len(ends):
    raise RecordError(f"{path}: not a complete JSON array (unbalanced brackets or an unclosed "
                      "string near the end); check that the file was fully written.")
  return starts, ends, lines


class JsonArraySource(_FileSource):
  """A JSON file holding one array of objects, indexed by byte offsets (never json.load-ed)."""

  def __init__(self, path: str):
    utf8 = _Utf8Check(path)
    super().__init__(path, *index_json_array(path, utf8))
    self.encoding_error = utf8.error

  def where(self, i: int) -> str:
    return f"{self.shown_path}:{int(self._lines[i])} (record {i} of the array)"

  def __getitem__(self, i: int) -> Any:
    raw = self._bytes(i)
    try:
      return json.loads(raw)
    except UnicodeDecodeError as e:
      raise RecordError(_not_utf8(self, i, raw, e)) from None
    except json.JSONDecodeError as e:
      raise RecordError(f"{self.where(i)}: malformed JSON ({e}); fix the record or set "
                        "config.data.skip_bad_records=True to skip such records.") from e


class ParquetSource:
  """Rows of a Parquet file, read one row group at a time.

  Grain reads a source from many threads at once (16 by default), so nothing here is shared
  unguarded: each thread opens its own pyarrow file (a ParquetFile is not thread-safe: shared, it
  crashed or hung in read_row_group), and decoded row groups sit in one cache shared by all
  threads, bounded by bytes (least recently used out first), each group decoded by one thread
  while the others wait for it, never twice at once.
  """

  CACHE_BYTES = 256 << 20  # decoded row groups kept (at least one, however large)

  def __init__(self, path: str):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    if not os.path.exists(path):
      raise FileNotFoundError(f"data file {path!r} does not exist (check config.data.train/eval).")
    self.path = path
    try:
      meta = pq.ParquetFile(path).metadata
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged file
      raise ValueError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e}).") from None
    self._offsets = np.cumsum([0] + [meta.row_group(g).num_rows
                                     for g in range(meta.num_row_groups)])
    self._init_shared()

  def _init_shared(self):
    self._local = threading.local()  # .file: this thread's pyarrow.parquet.ParquetFile
    self._lock = threading.Lock()  # guards _groups, _loading and _cached_bytes
    self._groups: collections.OrderedDict = collections.OrderedDict()  # group -> pyarrow.Table
    self._loading: dict[int, threading.Event] = {}  # groups being decoded by some thread now
    self._cached_bytes = 0

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def __getstate__(self):
    return {"path": self.path, "_offsets": self._offsets}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_shared()

  def _file(self):
    f = getattr(self._local, "file", None)
    if f is None:
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
      f = self._local.file = pq.ParquetFile(self.path)
    return f

  def _group(self, group: int):
    while True:
      with self._lock:
        table = self._groups.get(group)
        if table is not None:
          self._groups.move_to_end(group)
          return table
        event = self._loading.get(group)
        if event is None:  # this thread decodes it
          event = self._loading[group] = threading.Event()
          break
      event.wait()  # another thread is decoding it; then look again
    table = None
    try:
      table = self._file().read_row_group(group)
    finally:
      with self._lock:  # cached and no longer loading in one step: nobody decodes it again
        del self._loading[group]
        if table is not None:
          self._groups[group] = table
          self._cached_bytes += table.nbytes
          while self._cached_bytes > self.CACHE_BYTES and len(self._groups) > 1:
            _, old = self._groups.popitem(last=False)
            self._cached_bytes -= old.nbytes
      event.set()
    return table

  def __getitem__(self, i: int) -> dict:
    group = int(np.searchsorted(self._offsets, i, side="right") - 1)
    table = self._group(group)
    return table.slice(i - int(self._offsets[group]), 1).to_pylist()[0]

  def where(self, i: int) -> str:
    return f"{self.path} (row {i})"


class TsvSource(_FileSource):
  """Tab-separated values (CSL and many Chinese corpora ship so): each non-blank line a record
  {column: value}, the columns named by the first line (the header) or by `columns`
  ("title,abstract,..."; config.data.tsv_columns) when the file has no header. Fields are split
  at every tab; no quoting (a field holding a tab or newline is not TSV)."""

  def __init__(self, path: str, columns: str = ""):
    utf8 = _Utf8Check(path)
    starts, ends, lines = index_lines(path, utf8)
    super().__init__(path, starts, ends, lines)
    self.encoding_error = utf8.error
    names = [c.strip() for c in columns.split(",") if c.strip()]
    self.header_from = "config.data.tsv_columns"
    if not names:
      if not len(starts):
        self.columns = []
        return
      self.header_from = f"the header, line {int(lines[0])}"
      names = self._fields(0)
      self._starts, self._ends, self._lines = starts[1:], ends[1:], lines[1:]
    if len(set(names)) != len(names) or not all(names):
      raise ValueError(f"{path}: the TSV columns {names} (from {self.header_from}) must be "
                       "distinct and non-empty; name them with config.data.tsv_columns.")
    self.columns = names

  def _fields(self, i: int) -> list[str]:
    raw = self._bytes(i)
    try:
      return raw.decode("utf-8").rstrip("\r").split("\t")
    except UnicodeDecodeError as e:
      raise RecordError(_not_utf8(self, i, raw, e)) from None

  def __getitem__(self, i: int) -> dict:
    fields = self._fields(i)
    if len(fields) != len(self.columns):
      raise RecordError(
          f"{self.where(i)}: {len(fields)} tab-separated fields, but {self.header_from} names "
          f"{len(self.columns)} columns {self.columns}; fix the line, set "
          "config.data.tsv_columns if the file has no header, or set "
          "config.data.skip_bad_records=True.")
    return dict(zip(self.columns, fields))


class ArrayRecordSource:
  """ArrayRecord files whose records are UTF-8 JSON objects or plain UTF-8 text."""

  def __init__(self, path: str):
    import grain  # pylint: disable=g-import-not-at-top
    if not os.path.exists(path):
      raise FileNotFoundError(f"data file {path!r} does not exist (check config.data.train/eval).")
    self.path = path
    self._source = grain.sources.ArrayRecordDataSource([path])

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> Any:
    return _decode_bytes_record(self._source[i], self, i)

  def where(self, i: int) -> str:
    return f"{self.path} (record {i})"


def _decode_bytes_record(raw: bytes, source, i: int) -> Any:
  text = raw.decode("utf-8", errors="replace")
  if text.lstrip().startswith("{"):
    try:
      return json.loads(text)
    except json.JSONDecodeError as e:
      raise RecordError(f"{source.where(i)}: malformed JSON ({e}).") from e
  return text


class TfdsSource:
  """A TFDS dataset prepared locally (array_record format), read through tfds.data_source."""

  def __init__(self, name: str, split: str, data_dir: str | None):
    packages.require("tensorflow_datasets")  # an optional install (TensorFlow itself is not needed)
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.path = f"tfds:{name}:{split}"
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                      download=False)
    except Exception as e:  # TFDS raises several types for "not prepared here"
      raise FileNotFoundError(
          f"{self.path}: cannot open the TFDS dataset ({type(e).__name__}: {e}). Prepare it "
          "locally in array_record format (tfds build --file_format=array_record) and set "
          "config.data.tfds_data_dir; nothing is downloaded at run time.") from e

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict:
    record = self._source[i]
    return {k: (v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v)
            for k, v in record.items()}

  def where(self, i: int) -> str:
    return f"{self.path} (record {i})"


class ListSource:
  """Records already in memory (the generated built-in dataset)."""

  def __init__(self, name: str, records: list):
    self.path, self._records = name, records

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i: int) -> Any:
    return self._records[i]

  def where(self, i: int) -> str:
    return f"{self.path} (record {i})"


class ConcatSource:
  """Several sources of the same format read as one (a glob of files)."""

  def __init__(self, sources: list):
    self.path = ",".join(s.path for s in sources)
    self._sources = sources
    self._offsets = list(np.cumsum([0] + [len(s) for s in sources]))

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def _locate(self, i: int):
    k = bisect.bisect_right(self._offsets, i) - 1
    return self._sources[k], i - int(self._offsets[k])

  def __getitem__(self, i: int) -> Any:
    source, j = self._locate(i)
    return source[j]

  def where(self, i: int) -> str:
    source, j = self._locate(i)
    return source.where(j)


# files.kind -> the source that reads it
_SOURCES = {"jsonl": JsonlSource, "json_array": JsonArraySource, "parquet": ParquetSource,
            "array_record": ArrayRecordSource, "text": TextLineSource}


def encoding_errors(source) -> list[str]:
  """The encoding problems (one line each) of a source opened with strict_utf8=False."""
  inner = getattr(source, "_sources", [source])
  return [e for e in (getattr(s, "encoding_error", None) for s in inner) if e]


def open_file(path: str, *, strict_utf8: bool = True, tsv_columns: str = ""):
  """The source for one file, chosen by its kind (files.kind: extension, and for .json its first
  byte). Checked first (files.check_file), each problem one line naming the file and the fix.
  A gzip-compressed file (`.jsonl.gz`, `.json.gz`, `.txt.gz`) is decompressed once into a cache
  and read from there (random access into gzip would mean decompressing from the start; see
  files.decompressed for where the copy goes and when it is removed).

  strict_utf8: a text file with bytes that are not UTF-8 anywhere is refused (its first bad line
  named); False opens it (the caller skips the bad lines, which raise RecordError when read).
  tsv_columns: the column names of a .tsv file without a header line ("" = its first line).
  """
  files.check_file(path)
  if path.lower().endswith(".gz"):
    copy = files.decompressed(path)
    try:
      source = open_file(copy, strict_utf8=strict_utf8, tsv_columns=tsv_columns)
    except ValueError as e:  # name the user's file, not the cache copy
      raise ValueError(str(e).replace(copy, path)) from None
    if hasattr(source, "shown_path"):
      source.shown_path = path
    if getattr(source, "encoding_error", None):
      source.encoding_error = source.encoding_error.replace(copy, path)
    return source
  kind = files.kind(path)
  source = TsvSource(path, tsv_columns) if kind == "tsv" else _SOURCES[kind](path)
  if strict_utf8 and getattr(source, "encoding_error", None):
    raise ValueError(source.encoding_error)
  return source


def open_path(path: str, tfds_data_dir: str = "", *, strict_utf8: bool = True,
              tsv_columns: str = ""):
  """A source for a path, a glob, or `tfds:NAME[:SPLIT]` (options: see open_file)."""
  if path.startswith("tfds:"):
    name, _, split = path[len("tfds:"):].partition(":")
    return TfdsSource(name, split or "train", tfds_data_dir)
  names = files.expand(path)
  opened = [open_file(f, strict_utf8=strict_utf8, tsv_columns=tsv_columns) for f in names]
  return opened[0] if names == [path] else ConcatSource(opened)
