"""SentencePiece tokenizer with ChatML special tokens: train, load, cache, compare.

Training settings are chosen so that encode -> decode is lossless: identity normalisation (no
NFKC folding of full-width characters), no whitespace collapsing or dummy prefix, whitespace-only
pieces allowed (code indentation), byte fallback (no character is ever unknown) and split digits.
The ChatML tokens are SentencePiece *control* symbols: they are single ids that `encode` never
produces from text, so a user typing "<|im_start|>" cannot forge a turn. <think>/</think> are
*user-defined* symbols instead: reasoning data writes them inside assistant text and they must
become single tokens there.
"""

from __future__ import annotations

import io
import itertools
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator

from absl import logging
import sentencepiece as spm

from llm_jax import console

PAD, UNK = "<pad>", "<unk>"
EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK, END_THINK = "<think>", "</think>"
CONTROL_SYMBOLS = (EOS, IM_START, IM_END)
USER_SYMBOLS = (THINK, END_THINK)
MODEL_FILE = "tokenizer.model"
_META = "\u2581"  # SentencePiece's whitespace symbol
# SentencePiece skips training lines longer than this many bytes; we cut lines to stay under it.
_MAX_LINE_CHARS = 2000


class Tokenizer:
  """A SentencePiece model plus the ids the pipeline and the model need."""

  def __init__(self, model_proto: bytes, source: str = "<memory>"):
    self._proto = model_proto
    self.source = source
    self._sp = spm.SentencePieceProcessor()
    self._sp.LoadFromSerializedProto(model_proto)
    self.vocab_size = self._sp.GetPieceSize()
    self.pad_id = self._optional_id(PAD)
    if self.pad_id is None:
      self.pad_id = max(self._sp.pad_id(), 0)
    self.eos_id = self._optional_id(EOS)
    if self.eos_id is None and self._sp.eos_id() >= 0:
      self.eos_id = self._sp.eos_id()  # e.g. "</s>" in a model trained elsewhere
    self.im_start_id = self._optional_id(IM_START)
    self.im_end_id = self._optional_id(IM_END)
    # Control pieces decode to "" in SentencePiece; we render them as their text instead.
    self._control_ids = frozenset(
        i for i in range(self.vocab_size) if self._sp.IsControl(i) or self._sp.IsUnknown(i))
    # SentencePiece writes spaces as U+2581 "▁", so a literal "▁" in text would decode as a
    # space. With byte fallback we spell it as its three UTF-8 bytes, which decode back to "▁".
    meta_bytes = [self._sp.PieceToId(f"<0x{b:02X}>") for b in _META.encode()]
    self._meta_ids = meta_bytes if all(self._sp.IsByte(i) for i in meta_bytes) else None

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    if not os.path.isfile(path):
      raise FileNotFoundError(f"SentencePiece model {path!r} does not exist; set "
                              "config.data.tokenizer.path to a .model file, or to '' to train one.")
    with open(path, "rb") as f:
      return cls(f.read(), source=path)

  def _optional_id(self, piece: str) -> int | None:
    i = self._sp.PieceToId(piece)
    return None if i == self._sp.unk_id() and piece != UNK else i

  def __getstate__(self):  # grain worker processes receive the tokenizer by pickling
    return {"proto": self._proto, "source": self.source}

  def __setstate__(self, state):
    self.__init__(state["proto"], state["source"])

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; never adds BOS/EOS, never emits ChatML control ids."""
    if _META not in text or self._meta_ids is None:
      return self._sp.EncodeAsIds(text)
    ids = []
    for k, part in enumerate(text.split(_META)):
      if k:
        ids.extend(self._meta_ids)
      ids.extend(self._sp.EncodeAsIds(part))
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; control tokens appear as their text (e.g. "<|im_end|>")."""
    out, run = [], []
    for i in ids:
      i = int(i)
      if i in self._control_ids:
        if run:
          out.append(self._sp.DecodeIds(run))
          run = []
        out.append(self._sp.IdToPiece(i))
      else:
        run.append(i)
    if run:
      out.append(self._sp.DecodeIds(run))
    return "".join(out)

  def token_to_id(self, piece: str) -> int:
    i = self._optional_id(piece)
    if i is None:
      raise KeyError(f"token {piece!r} is not in the vocabulary of {self.source}")
    return i

  def id_to_token(self, i: int) -> str:
    return self._sp.IdToPiece(int(i))

  def require_chat_tokens(self) -> None:
    missing = [p for p, i in ((IM_START, self.im_start_id), (IM_END, self.im_end_id)) if i is None]
    if missing:
      raise ValueError(f"tokenizer {self.source} has no {missing} token(s), so it cannot render "
                       "ChatML conversations; train one with config.data.tokenizer.path=''.")

  def save(self, directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, MODEL_FILE)
    _atomic_write(path, self._proto)
    return path


def _atomic_write(path: str, data: bytes) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tok-")
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  # mkstemp makes the file 0600; a tokenizer is shared like any other output (umask applies).
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o666 & ~umask)
  os.replace(tmp, path)  # readers never see a half-written model


def _training_lines(texts: Iterable[str], max_lines: int) -> Iterator[str]:
  """Lines of `texts`, cut to SentencePiece's line limit; newlines are learned as bytes."""
  def lines():
    for text in texts:
      for line in text.split("\n"):
        for start in range(0, len(line), _MAX_LINE_CHARS):
          piece = line[start:start + _MAX_LINE_CHARS]
          if piece.strip():
            yield piece
  return itertools.islice(lines(), max_lines)


def train_sentencepiece(texts: Iterable[str], *, vocab_size: int, model_type: str = "bpe",
                        max_sentences: int = 200_000,
                        character_coverage: float = 0.9995) -> Tokenizer:
  """Trains a byte-fallback SentencePiece model with ChatML specials on `texts`."""
  if model_type not in ("bpe", "unigram"):
    raise ValueError(f"config.data.tokenizer.model_type={model_type!r}; use 'bpe' or 'unigram'.")
  # Minutes on a large corpus, silent inside SentencePiece: said as a phase (console.Phase).
  with console.Phase(f"training a {model_type} SentencePiece tokenizer ({vocab_size:,} pieces)") as phase:
    tok, n_lines = _train_sentencepiece(texts, vocab_size, model_type, max_sentences,
                                        character_coverage)
    phase.result = f"{tok.vocab_size:,} pieces from {n_lines:,} lines"
  return tok


def _train_sentencepiece(texts, vocab_size, model_type, max_sentences,
                         character_coverage) -> tuple[Tokenizer, int]:
  """(the tokenizer, how many training lines it saw)."""
  # SentencePiece holds its training lines in memory anyway; a list lets us retry.
  start = time.time()
  lines = list(_training_lines(texts, max_sentences))
  if not lines:
    raise ValueError("cannot train a tokenizer: the corpus is empty (check config.data.train).")
  logging.info("tokenizer training sample: %s lines, %.1f MB of text, read in %.1f s",
               f"{len(lines):,}", sum(len(line.encode()) for line in lines) / 1e6,
               time.time() - start)
  # A Chinese corpus can need more distinct characters than the vocabulary holds at the
  # requested coverage; byte fallback covers rare characters, so lower coverage and retry.
  coverages = [character_coverage] + [c for c in (0.999, 0.995, 0.99, 0.98)
                                      if c < character_coverage]
  for k, coverage in enumerate(coverages):
    model = io.BytesIO()
    try:
      spm.SentencePieceTrainer.Train(
          sentence_iterator=iter(lines),
          model_writer=model,
          vocab_size=vocab_size,
          model_type=model_type,
          character_coverage=coverage,
          byte_fallback=True,
          split_digits=True,
          normalization_rule_name="identity",
          remove_extra_whitespaces=False,
          add_dummy_prefix=False,
          allow_whitespace_only_pieces=True,
          split_by_whitespace=True,
          max_sentencepiece_length=16,
          pad_id=0, pad_piece=PAD, unk_id=1, unk_piece=UNK, bos_id=-1, eos_id=-1,
          control_symbols=list(CONTROL_SYMBOLS),
          user_defined_symbols=list(USER_SYMBOLS),
          # A small corpus may not support the requested size; take what it supports.
          hard_vocab_limit=False,
          num_threads=os.cpu_count() or 1,
          minloglevel=2,
      )
      break
    except RuntimeError as e:
      if "required_chars" not in str(e):
        raise
      if k == len(coverages) - 1:  # SentencePiece accepts no coverage below 0.98
        raise ValueError(f"vocab_size={vocab_size} is too small for this corpus even at "
                         f"character coverage 0.98 ({e}); raise "
                         "config.data.tokenizer.vocab_size.") from e
      logging.warning("vocab_size=%d cannot hold every character at coverage %.4f; retrying "
                      "with %.4f (rarer characters become byte tokens)", vocab_size, coverage,
                      coverages[k + 1])
  return Tokenizer(model.getvalue()), len(lines)


def get_tokenizer(tok_cfg, workdir: str | None, corpus_fn: Callable[[], Iterable[str]]):
  """Picks the tokenizer named by `tok_cfg.path`, or trains one and caches it in `workdir`.

  path "" -> workdir/tokenizer.model if present, else SentencePiece trained on corpus_fn();
  a tokenizer.json (or a directory holding one) -> HFTokenizer; anything else -> a .model file.
  """
  path = tok_cfg.path
  if path:
    if os.path.isdir(path):
      if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return _hf_tokenizer(path)
      if os.path.isfile(os.path.join(path, MODEL_FILE)):
        return Tokenizer.load(os.path.join(path, MODEL_FILE))
      raise FileNotFoundError(f"tokenizer directory {path!r} holds neither tokenizer.json nor "
                              f"{MODEL_FILE}.")
    if os.path.basename(path) == "tokenizer.json":
      return _hf_tokenizer(path)
    return Tokenizer.load(path)
  cached = os.path.join(workdir, MODEL_FILE) if workdir else None
  if cached and os.path.isfile(cached):
    logging.info("reusing the tokenizer cached at %s", cached)
    return Tokenizer.load(cached)
  tok = train_sentencepiece(corpus_fn(), vocab_size=tok_cfg.vocab_size,
                            model_type=tok_cfg.model_type,
                            max_sentences=tok_cfg.train_max_sentences,
                            character_coverage=tok_cfg.character_coverage)
  if workdir:
    tok.source = tok.save(workdir)
  return tok


def _hf_tokenizer(path: str):
  # Imported lazily: the HF tokenizer pulls in `tokenizers`, which most jobs never need.
  from llm_jax.data.hf_tokenizer import HFTokenizer  # pylint: disable=g-import-not-at-top
  return HFTokenizer(path)


SUMMARY_SAMPLE = ("李明宇于1965年3月12日出生在杭州。臺灣的繁體字也要無損。"
                  "Li Mingyu studied physics. def f(x):\n    return x ** 2  # 🙂")


def summarize(tok) -> str:
  """Human-readable facts about a tokenizer: size, compression on a sample, special ids."""
  ids = tok.encode(SUMMARY_SAMPLE)
  specials = {p: getattr(tok, a) for p, a in ((EOS, "eos_id"), (IM_START, "im_start_id"),
                                              (IM_END, "im_end_id"), (PAD, "pad_id"))}
  return (f"vocab_size={tok.vocab_size} chars/token={len(SUMMARY_SAMPLE) / len(ids):.2f} "
          f"(on a {len(SUMMARY_SAMPLE)}-char mixed sample) special ids={specials} "
          f"round_trip_ok={tok.decode(ids) == SUMMARY_SAMPLE}")


def same_tokenizer(path: str, own: str) -> bool | None:
  """Whether two tokenizers (a file, or a directory holding tokenizer.json / the SentencePiece
  model) are the same bytes; None when either cannot be found."""
  def files(p):
    if os.path.isdir(p):
      for name in ("tokenizer.json", MODEL_FILE):
        if os.path.isfile(os.path.join(p, name)):
          return os.path.join(p, name)
    return p
  a, b = files(path), files(own)
  if os.path.abspath(a) == os.path.abspath(b):
    return True
  if not (os.path.isfile(a) and os.path.isfile(b)):
    return None
  with open(a, "rb") as fa, open(b, "rb") as fb:
    return fa.read() == fb.read()
