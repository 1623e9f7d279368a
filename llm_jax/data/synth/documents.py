"""Documents -> cleaned text -> overlapping chunks that start and end at sentence ends.

Documents come from the same readers as training data (`sources.open_path`, `formats`): any
text file, `{"text"}` JSONL/JSON/Parquet, a glob. A chunk is a run of whole sentences whose
size (characters, or tokens of a given tokenizer) stays within the budget; the next chunk
starts with the last sentences of the previous one, up to `overlap` of the same unit, so a
fact that straddles a border is whole in one of them. A single sentence longer than the budget
is cut hard (`text_clean.cut_at_sentences` for characters).

Ids are stable across runs (the ledger relies on it): a document is `<file name>:<record
index>` (or the value of `doc_id_field`, which may group several records into one document
for the train/val split), a chunk `<file name>:<record index>/<chunk index>`.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
from collections.abc import Callable, Iterator

from llm_jax.data import formats, sources, text_clean

_CLOSERS = "”’\"')）」』]】"


@dataclasses.dataclass(frozen=True)
class Chunk:
  doc_id: str  # the document (train/val split unit)
  chunk_id: str  # unique and stable: "<file>:<record>/<k>"
  text: str
  where: str  # file:line of the record, for messages

  @property
  def sha(self) -> str:
    return hashlib.sha1(self.text.encode("utf-8")).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class ChunkSpec:
  budget: int = 4000  # max chunk size in `unit`s
  overlap: int = 200  # size carried over from the end of the previous chunk
  sentence_ends: str = "。！？.!?"


def split_sentences(text: str, ends: str = "。！？.!?") -> list[str]:
  """Sentences of `text`, each with its end mark, closing quotes/brackets and trailing space.

  The same rules as `text_clean.cut_at_sentences`: a period is a sentence end only before
  whitespace, a closer or the end of the text (3.14, e.g. and U.S. stay whole); a newline
  ends a sentence too (paragraph breaks). Concatenating the result gives `text` back.
  """
  out, start, i, n = [], 0, 0, len(text)
  while i < n:
    ch = text[i]
    end = -1
    if ch in ends:
      nxt = text[i + 1] if i + 1 < n else " "
      if ch != "." or nxt.isspace() or nxt in _CLOSERS:
        end = i + 1
        while end < n and text[end] in _CLOSERS:
          end += 1
    elif ch == "\n":
      end = i + 1
    if end > 0:
      while end < n and text[end] in " \t\n":
        end += 1
      out.append(text[start:end])
      start = i = end
      continue
    i += 1
  if start < n:
    out.append(text[start:])
  return out


def _hard_cut(sentence: str, budget: int, size: Callable[[str], int]) -> list[str]:
  """A sentence over the budget in pieces that fit (characters: cut_at_sentences' hard cut;
  tokens: the longest prefix that fits, found by bisection)."""
  if size is len:
    return text_clean.cut_at_sentences(sentence, budget, sentence_ends="")
  pieces = []
  while sentence:
    if size(sentence) <= budget:
      pieces.append(sentence)
      break
    lo, hi = 1, len(sentence)  # invariant: prefix of lo chars fits (or lo == 1), hi does not
    while hi - lo > 1:
      mid = (lo + hi) // 2
      if size(sentence[:mid]) <= budget:
        lo = mid
      else:
        hi = mid
    pieces.append(sentence[:lo])
    sentence = sentence[lo:]
  return pieces


def chunk_text(text: str, spec: ChunkSpec, size: Callable[[str], int] = len) -> list[str]:
  """Chunks of whole sentences, each of size <= spec.budget, consecutive chunks sharing up to
  spec.overlap of trailing sentences. `size` measures a string (len, or a token count; a
  chunk's size is the sum over its sentences)."""
  sentences = []
  for s in split_sentences(text, spec.sentence_ends):
    sentences += [s] if size(s) <= spec.budget else _hard_cut(s, spec.budget, size)
  sizes = [size(s) for s in sentences]
  chunks, i, n = [], 0, len(sentences)
  while i < n:
    j, total = i, 0
    while j < n and (j == i or total + sizes[j] <= spec.budget):
      total += sizes[j]
      j += 1
    chunks.append("".join(sentences[i:j]).strip())
    if j >= n:
      break
    # The next chunk starts with this one's trailing sentences that fit in the overlap and
    # still leave room for the next new sentence (no chunk holds only old text); it always
    # starts after this one's first sentence.
    k, carried = j, 0
    while (k - 1 > i and carried + sizes[k - 1] <= spec.overlap
           and carried + sizes[k - 1] + sizes[j] <= spec.budget):
      carried += sizes[k - 1]
      k -= 1
    i = k
  return [c for c in chunks if c]


@dataclasses.dataclass(frozen=True)
class DocOptions:
  paths: tuple[str, ...]
  text_field: str = "text"
  doc_id_field: str = ""  # "" = one document per record
  clean: bool = True
  skip_bad_records: bool = False
  max_docs: int = 0  # 0 = all


class DocumentError(ValueError):
  """A document file or record a user supplied cannot be used; the message names it."""


def _expand(path: str) -> list[str]:
  if path.startswith("tfds:") or not any(ch in path for ch in "*?["):
    return [path]
  files = sorted(glob.glob(path))
  if not files:
    raise DocumentError(f"--docs: the pattern {path!r} matches no files.")
  return files


def _open_sources(paths: tuple[str, ...]) -> list[tuple[str, object]]:
  """(file name, source) per file; file names are part of ids, so they must be unique."""
  out, seen = [], {}
  for path in (f for p in paths for f in _expand(p)):
    name = path if path.startswith("tfds:") else os.path.basename(path)
    if name in seen:
      if os.path.abspath(seen[name]) == os.path.abspath(path):
        continue  # the same file listed twice
      raise DocumentError(f"--docs: two files are named {name!r} ({seen[name]} and {path}); "
                          "chunk ids start with the file name, so rename one.")
    seen[name] = path
    out.append((name, sources.open_path(path)))
  return out


def iter_documents(opts: DocOptions, on_skip: Callable[[str], None] | None = None
                   ) -> Iterator[tuple[str, str, str, str]]:
  """(record key "<file>:<index>", doc id, cleaned text, where) for each usable record.

  Raises DocumentError naming the file and line for a record that is not a text document
  (unless skip_bad_records, which reports it through on_skip and goes on)."""
  count = 0
  for name, source in _open_sources(opts.paths):
    fmt = None
    for i in range(len(source)):
      if opts.max_docs and count >= opts.max_docs:
        return
      where = source.where(i)
      try:
        record = source[i]
        if fmt is None:
          fmt = formats.detect_format(record, opts.text_field, where)
          if fmt != "text":
            raise DocumentError(
                f"{where}: --docs wants text documents, but this file holds {fmt} records; "
                f"give files of plain text or {{{opts.text_field!r}: ...}} records "
                "(see --text_field).")
        text = formats.normalize(record, "text", opts.text_field, where)["text"]
        doc_id = f"{name}:{i}"
        if opts.doc_id_field:
          if not isinstance(record, dict) or record.get(opts.doc_id_field) in (None, ""):
            raise DocumentError(f"{where}: the record has no field {opts.doc_id_field!r} "
                                "(--doc_id_field); fix the record or leave the flag empty.")
          doc_id = str(record[opts.doc_id_field])
      except sources.RecordError as e:
        if not opts.skip_bad_records:
          raise DocumentError(f"{e} (--skip_bad_records skips such records)") from None
        if on_skip:
          on_skip(str(e))
        continue
      if opts.clean:
        text = text_clean.clean_markup(text)
      if not text.strip():
        continue
      count += 1
      yield f"{name}:{i}", doc_id, text, where


def iter_chunks(opts: DocOptions, spec: ChunkSpec, size: Callable[[str], int] = len,
                on_skip: Callable[[str], None] | None = None) -> Iterator[Chunk]:
  for key, doc_id, text, where in iter_documents(opts, on_skip):
    for k, piece in enumerate(chunk_text(text, spec, size)):
      yield Chunk(doc_id=doc_id, chunk_id=f"{key}/{k}", text=piece, where=where)


def token_counter(tokenizer_path: str) -> Callable[[str], int]:
  """len(encode(text)) for a SentencePiece .model, a tokenizer.json, or a directory holding
  either (a run directory works)."""
  from llm_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top

  class _Cfg:
    path = tokenizer_path
  tok = tok_lib.get_tokenizer(_Cfg, None, lambda: [])
  return lambda text: len(tok.encode(text))
