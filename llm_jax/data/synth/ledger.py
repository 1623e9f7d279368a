"""Resumable output: JSONL files written in whole lines, and a ledger of finished chunks.

  qa.jsonl           (or qa.train.jsonl + qa.val.jsonl with a split)
  qa.ledger.jsonl    line 1: {"settings": ...}; then one line per finished chunk:
                     {"chunk", "sha", "status", "records", "ends": {split: byte size after it}}
  qa.lock            while a run writes them: its host, pid, start time and command

A chunk is committed by appending all its records to the output in one write per file, then
its ledger line. One run writes a set of files at a time: it holds qa.lock (`lock_path`) and a
second run on the same --out is refused before it reads or cuts anything. The ledger is the
commit record: output bytes beyond the `ends` of its last
line belong to a chunk that was never committed (the process died between the two writes, or
inside one) and are cut off when the run resumes, so a crash never leaves a torn line or a
duplicate. A torn last ledger line is dropped the same way. Outputs are fsync-ed before their
ledger line, so a power cut cannot leave a ledger line pointing past the data.
"""

from __future__ import annotations

import json
import os

from absl import logging

from llm_jax.data.synth import validate

LEDGER_VERSION = 1


class LedgerError(ValueError):
  """The output and its ledger disagree, or were made with other settings."""


def _stem_ext(out: str) -> tuple[str, str]:
  stem, ext = os.path.splitext(out)
  if ext not in (".jsonl", ".json"):
    stem, ext = out, ".jsonl"
  return stem, ext


def lock_path(out: str) -> str:
  """The lock file of --out's set of files (qa.jsonl -> qa.lock): every --out sharing a ledger
  shares it, so one writer appends at a time (workdir_lock.py)."""
  return _stem_ext(out)[0] + ".lock"


def paths_for(out: str, splits: tuple[str, ...]) -> tuple[dict[str, str], str, str]:
  """({split: output path}, ledger path, summary path) for --out; one split -> out itself."""
  stem, ext = _stem_ext(out)
  outputs = ({splits[0]: out} if len(splits) == 1 else
             {s: f"{stem}.{s}{ext}" for s in splits})
  return outputs, f"{stem}.ledger.jsonl", f"{stem}.summary.json"


def _read_complete_lines(path: str) -> tuple[list[bytes], int]:
  """Complete lines of a file and the byte length they span (a torn tail is not included)."""
  with open(path, "rb") as f:
    data = f.read()
  end = data.rfind(b"\n") + 1
  return data[:end].splitlines(), end


class Store:
  """Opens (or creates) the outputs and ledger; `commit` appends one chunk's records."""

  def __init__(self, out: str, splits: tuple[str, ...], settings: dict, *, fsync: bool = True):
    self.outputs, self.ledger_path, self.summary_path = paths_for(out, splits)
    self.splits = splits
    self._fsync = fsync
    self.done: dict[str, str] = {}  # chunk id -> text sha of finished chunks
    self.failed: set[str] = set()  # finished as rejected by the endpoint (400)
    self.records: dict[str, int] = {s: 0 for s in splits}  # records in each output
    self.dropped_bytes = 0  # uncommitted output cut off on resume
    self.resumed = os.path.exists(self.ledger_path)
    for path in [*self.outputs.values(), self.ledger_path]:
      if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    if self.resumed:
      ends = self._load_ledger(settings)
    else:
      for path in self.outputs.values():
        if os.path.exists(path) and os.path.getsize(path) > 0:
          raise LedgerError(f"{path} exists but its ledger {self.ledger_path} does not; it was not "
                            "written by this tool or the ledger was removed. Choose another --out "
                            "or move the file away.")
      with open(self.ledger_path, "wb") as f:
        f.write(_line({"settings": settings, "version": LEDGER_VERSION}))
      ends = {s: 0 for s in splits}
    self._fds = {}
    self._sizes = {}
    for split, path in self.outputs.items():
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
      size = os.fstat(fd).st_size
      if size < ends[split]:
        os.close(fd)
        raise LedgerError(f"{path} holds {size} bytes but its ledger {self.ledger_path} "
                          f"recorded {ends[split]}; the output was edited or truncated. Restore "
                          "it, or start over with another --out.")
      if size > ends[split]:
        self.dropped_bytes += size - ends[split]
        os.ftruncate(fd, ends[split])
      os.lseek(fd, 0, os.SEEK_END)
      self._fds[split], self._sizes[split] = fd, ends[split]
    self._ledger_fd = os.open(self.ledger_path, os.O_WRONLY | os.O_APPEND)

  def _load_ledger(self, settings: dict) -> dict[str, int]:
    lines, complete = _read_complete_lines(self.ledger_path)
    if os.path.getsize(self.ledger_path) > complete:  # a torn last line from a crash
      os.truncate(self.ledger_path, complete)
    if not lines:
      raise LedgerError(f"{self.ledger_path} is empty; delete it (and the output) to start over.")
    entries = []
    for k, raw in enumerate(lines):
      try:
        entries.append(json.loads(raw))
      except json.JSONDecodeError:
        raise LedgerError(f"{self.ledger_path}:{k + 1}: not a JSON line; the ledger is damaged. "
                          "Delete it and the output to start over.") from None
    header = entries[0]
    if "settings" not in header:
      raise LedgerError(f"{self.ledger_path}:1: no settings line; not a ledger of this tool.")
    _check_settings(header["settings"], settings, self.ledger_path)
    ends = {s: 0 for s in self.splits}
    for e in entries[1:]:
      self.done[e["chunk"]] = e["sha"]
      if e.get("status") == "rejected":
        self.failed.add(e["chunk"])
      else:
        self.failed.discard(e["chunk"])
      ends.update(e["ends"])
    return ends

  def load_questions(self) -> set[str]:
    """Normalized questions already in the outputs (dedup across runs); counts the records."""
    seen = set()
    for split, path in self.outputs.items():
      with open(path, "rb") as f:
        for k, raw in enumerate(f):
          try:
            seen.add(validate.normalize(json.loads(raw)["messages"][-2]["content"]))
          except (ValueError, KeyError, IndexError, TypeError):
            raise LedgerError(f"{path}:{k + 1}: not a record written by this tool; the output was "
                              "edited. Restore it, or start over with another --out.") from None
          self.records[split] += 1
    return seen

  def commit(self, chunk_id: str, sha: str, records: dict[str, list[dict]], status: str) -> None:
    for split, recs in records.items():
      if not recs:
        continue
      data = b"".join(_line(r) for r in recs)
      _write_all(self._fds[split], data)
      if self._fsync:
        os.fsync(self._fds[split])
      self._sizes[split] += len(data)
      self.records[split] += len(recs)
    entry = {"chunk": chunk_id, "sha": sha, "status": status,
             "records": sum(len(r) for r in records.values()), "ends": dict(self._sizes)}
    _write_all(self._ledger_fd, _line(entry))
    self.done[chunk_id] = sha
    if status == "rejected":
      self.failed.add(chunk_id)
    else:
      self.failed.discard(chunk_id)

  def close(self) -> None:
    for fd in [*self._fds.values(), self._ledger_fd]:
      if self._fsync:
        os.fsync(fd)
      os.close(fd)
    self._fds = {}


def _line(obj) -> bytes:
  return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


def _write_all(fd: int, data: bytes) -> None:
  view = memoryview(data)
  while view:
    view = view[os.write(fd, view):]


def _check_settings(old: dict, new: dict, path: str) -> None:
  changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
  if changed:
    detail = "; ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in changed[:4])
    raise LedgerError(f"{path} was written with other settings ({detail}). Rerun with the same "
                      "settings to continue, or choose another --out to start a new set.")
  logging.debug("ledger settings match: %s", path)
