"""What a user's data file is, checked before any work starts: its kind (by extension, and for
.json by its first byte), that it exists, is readable and is UTF-8 text, that a .json holds
records and not one wrapping object, and the decompressed cache copy of a .gz file. Each
problem is one line naming the file (and line) and the fix. sources.py reads the records.
"""

from __future__ import annotations

import glob
import json
import os

from llm_jax import paths

# extension -> kind (sources.py maps each kind to the source that reads it); ".json" is
# "json_array" when the file opens with "[", else JSON Lines.
_KINDS = {".jsonl": "jsonl", ".json": "json", ".txt": "text", ".text": "text", ".md": "text",
          ".tsv": "tsv",
          ".parquet": "parquet", ".array_record": "array_record", ".arrayrecord": "array_record"}
_TEXT_KINDS = ("jsonl", "json", "text", "tsv")
_UNKNOWN = ("unknown extension; use .txt, .jsonl, .json, .tsv, .parquet or .array_record "
            "(optionally .gz-compressed).")


def _kind_by_name(path: str) -> str | None:
  lower = path.lower()
  if ".array_record-" in lower:  # sharded ArrayRecord files: name.array_record-00000-of-00008
    return "array_record"
  return next((k for ext, k in _KINDS.items() if lower.endswith(ext)), None)


def kind(path: str) -> str:
  """jsonl | json_array | text | tsv | parquet | array_record, of an uncompressed file."""
  k = _kind_by_name(path)
  if k is None:
    raise ValueError(f"data file {path!r}: {_UNKNOWN}")
  if k == "json":
    # Some ".json" files are really JSON Lines; a top-level array is indexed by object offsets.
    return "json_array" if first_nonspace_byte(path) == b"[" else "jsonl"
  return k


def check_file(path: str) -> None:
  """The checks made before a file is indexed: cheap enough to run on every source before a job
  starts any work (see train/run_setup.py preflight)."""
  if os.path.isdir(path):
    raise ValueError(f"data file {path!r} is a directory; name the files in it, e.g. "
                     f"{os.path.join(path, '*.jsonl')!r} (a glob), or list them comma-separated.")
  if not os.path.exists(path):
    raise FileNotFoundError(f"data file {path!r} does not exist (check config.data.train/eval).")
  if not os.access(path, os.R_OK):
    raise PermissionError(f"data file {path!r} is not readable (check its permissions).")
  if path.lower().endswith(".gz"):
    return
  k = _kind_by_name(path)
  if k is None:
    raise ValueError(f"data file {path!r}: {_UNKNOWN}")
  if k in _TEXT_KINDS:
    check_utf8(path)
  if k == "json" and first_nonspace_byte(path) != b"[":
    check_not_single_object(path)


def expand(path: str) -> list[str]:
  """The files a source path names: itself, or a glob's matches (sorted)."""
  if any(ch in path for ch in "*?["):
    files = sorted(glob.glob(path))
    if not files:
      raise FileNotFoundError(f"the pattern {path!r} matches no files.")
    return files
  return [path]


def check_spec_path(path: str) -> None:
  """check_file for every file a source path names (a file or a glob; tfds: is checked when
  opened)."""
  if path.startswith("tfds:"):
    return
  for f in expand(path):
    check_file(f)


def first_nonspace_byte(path: str) -> bytes:
  with open(path, "rb") as f:
    while chunk := f.read(4096):
      stripped = chunk.lstrip()
      if stripped.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
        stripped = stripped[3:].lstrip()
      if stripped:
        return stripped[:1]
  return b""




_SNIFF = 1 << 20


def check_utf8(path: str) -> None:
  """Refuses a text file whose first MiB is not UTF-8 (e.g. GBK-encoded Chinese), naming the
  line of the first bad byte, instead of failing later as 'malformed JSON' or garbled text."""
  with open(path, "rb") as f:
    head = f.read(_SNIFF)
  try:
    head.decode("utf-8")
  except UnicodeDecodeError as e:
    if e.start >= len(head) - 4 and len(head) == _SNIFF:  # a character cut by the sniff window
      return
    line = head[:e.start].count(b"\n") + 1
    raise ValueError(not_utf8_message(path, line, head[e.start], e.start)) from None


def not_utf8_message(path: str, line: int, byte: int, offset: int) -> str:
  """The one line for a text file that is not UTF-8 where `offset` (0-based) is."""
  return (f"{path}:{line}: not UTF-8 text (byte 0x{byte:02x} at offset {offset}); convert the "
          "file to UTF-8, e.g. `iconv -f GBK -t UTF-8 in > out`.")


def check_not_single_object(path: str) -> None:
  """A .json file that starts with '{' is read as JSON Lines. Refuse one that is instead a single
  (pretty-printed or wrapping) object, which would otherwise become 'malformed JSON' at line 1
  or one record with the wrong keys."""
  with open(path, "rb") as f:
    first_line = f.readline()
    more = bool(f.readline().strip())
  if first_line.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
    first_line = first_line[3:]
  try:
    record = json.loads(first_line)
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise ValueError(f"{path}:1: one JSON object spread over several lines; llm_jax reads a JSON "
                     "array of records ([{...}, {...}]) or JSON Lines (one object per line).") from None
  if not more and isinstance(record, dict):
    lists = [k for k, v in record.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
    if lists:
      raise ValueError(f"{path}:1: a single JSON object whose records are under {lists[0]!r}; "
                       f"write them as a JSON array or JSON Lines (e.g. `jq -c '.{lists[0]}[]' "
                       f"{os.path.basename(path)} > data.jsonl`).")


def decompressed(path: str) -> str:
  """The decompressed copy of a .gz file in llm_jax's cache, $XDG_CACHE_HOME/llm_jax/decompressed
  (made once, written atomically; keyed by the file's path, size and modification time). Records
  are read by offset, which gzip cannot do without decompressing from the start, so the copy is
  kept: the log says where it goes and how big it is, and each call first removes the copies
  whose source is gone or has changed since (each copy has a `.source.json` naming its source)."""
  import gzip  # pylint: disable=g-import-not-at-top
  import hashlib  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  st = os.stat(path)
  source = os.path.abspath(path)
  key = hashlib.sha256(f"{source}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
  cache = paths.cache_dir("decompressed")
  os.makedirs(cache, exist_ok=True)
  clean_decompressed(cache)
  out = os.path.join(cache, f"{key}-{os.path.basename(path)[:-3]}")
  if not os.path.exists(out):
    logging.info("data: decompressing %s (%s) into %s, once: it is read from there while the "
                 ".gz is unchanged, and removed when it is gone or changed", path,
                 _size(st.st_size), out)
    tmp = f"{out}.tmp{os.getpid()}"
    try:
      with gzip.open(path, "rb") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    except (OSError, EOFError) as e:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise ValueError(f"{path}: cannot decompress ({e}); is it a complete gzip file?") from None
    with open(out + _SIDECAR, "w") as f:
      json.dump({"source": source, "size": st.st_size, "mtime_ns": st.st_mtime_ns}, f)
    os.replace(tmp, out)
  logging.info("data: %s is read from its decompressed copy %s (%s)", path, out,
               _size(os.path.getsize(out)))
  return out


_SIDECAR = ".source.json"


def _size(n: int) -> str:
  return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def clean_decompressed(cache: str) -> list[str]:
  """Removes the decompressed copies in `cache` whose source .gz is gone or changed (size or
  modification time), and partial copies of processes that are gone; returns what it removed."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  removed = []
  for name in os.listdir(cache):
    full = os.path.join(cache, name)
    if ".tmp" in name and not name.endswith(_SIDECAR):  # a copy being written: is its writer alive?
      pid = name.rsplit(".tmp", 1)[1]
      if pid.isdigit() and not os.path.exists(f"/proc/{pid}") and os.path.isdir("/proc"):
        removed.append(full)
      continue
    if not name.endswith(_SIDECAR):
      continue
    copy, meta = full[:-len(_SIDECAR)], {}
    try:
      with open(full) as f:
        meta = json.load(f)
      st = os.stat(meta["source"])
      if (st.st_size, st.st_mtime_ns) == (meta["size"], meta["mtime_ns"]):
        continue
      why = "changed"
    except FileNotFoundError:
      why = "gone"
    except (OSError, ValueError, KeyError, TypeError):
      continue  # unreadable metadata: leave it alone
    logging.info("data: removing %s: its source %s is %s", copy, meta.get("source"), why)
    removed += [copy, full]
  for f in removed:
    try:
      os.remove(f)
    except FileNotFoundError:
      pass
  return removed
