"""A run's tokenizer as GGUF tokenizer metadata that makes llama.cpp encode exactly as llm_jax does.

Two kinds are written, each only where llama.cpp's own tokenizer gives our ids:
  SentencePiece BPE (llm_jax's own, trained by data/tokenizer.py) -> tokenizer.ggml.model "llama"
      (llama.cpp's SPM tokenizer merges the highest-scoring adjacent pair, which is SentencePiece's
      BPE). The pieces' scores and types (normal, unknown, control, user-defined, unused, byte)
      are copied; add_space_prefix is the model's add_dummy_prefix (false in llm_jax: llama.cpp
      would otherwise put "▁" before every prompt); add_bos / add_eos false, as our encode adds
      neither. Refused: unigram models (llama.cpp would segment them by BPE merges, not Viterbi),
      a normalisation rule other than identity and remove_extra_whitespaces (llama.cpp's SPM path
      neither normalises nor collapses spaces).
  Byte-level BPE tokenizer.json (an imported Qwen2 / Llama 3 model) -> "gpt2" with the pre-tokenizer
      llama.cpp names for the split regex (qwen2, llama-bpe); any other regex, normaliser or model
      type is refused naming it.
In both, the ChatML tokens are CONTROL tokens (llama.cpp reads them from text only when asked to
parse specials, as our chat renders them), <think> is USER_DEFINED (always one token), the end of
generation is <|im_end|> (eos, eot) and <|endoftext|> is bos (never added) and an end token too.
A literal "▁" (U+2581) in user text is the one known difference: llm_jax spells it as bytes,
llama.cpp reads it as a space.
"""

import dataclasses
import json
import os

from llm_jax.convert import sp_to_hf
from llm_jax.data.tokenizer import EOS, IM_END, MODEL_FILE

# SentencePiece's ModelProto piece types and GGUF's token types share their numbering
# (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_SP_BPE = 2

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) for the split regexes of tokenizer.json
# (llama-vocab.cpp: LLAMA_VOCAB_PRE_TYPE_QWEN2 / _LLAMA3).
BPE_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}


class Unsupported(ValueError):
  """The run cannot be exported to GGUF as it is; the message is one line saying why."""

  def __init__(self, why: str):
    super().__init__(f"GGUF export refused, nothing written: {why}")


@dataclasses.dataclass
class Vocab:
  model: str  # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
  pre: str | None  # tokenizer.ggml.pre (gpt2 only)
  tokens: list[str]
  types: list[int]
  scores: list[float] | None  # SentencePiece piece scores (llama only)
  merges: list[str] | None  # "left right" (gpt2 only)
  add_space_prefix: bool
  special: dict[str, int]  # bos / eos / eot / unk / pad -> id (only those that exist)
  stops: list[str]  # texts of the tokens that end a turn (Ollama's stop parameters)

  def pad_to(self, n: int) -> None:
    """Fills the vocabulary up to the embedding's rows (models round it up for speed): llama.cpp
    requires one token per row. The extra ids are UNUSED, so nothing ever produces them."""
    if len(self.tokens) > n:
      raise Unsupported(f"the tokenizer has {len(self.tokens)} tokens but the model's embedding "
                        f"only {n} rows")
    for i in range(len(self.tokens), n):
      self.tokens.append(f"[PAD{i}]")
      self.types.append(UNUSED)
      if self.scores is not None:
        self.scores.append(-1e4)


def _chat_ids(index: dict[str, int], unk: int | None = None) -> tuple[dict[str, int], list[str]]:
  """Special ids by llm_jax's rules (tokenizer.py, hf_tokenizer.py): generation ends at
  <|im_end|> (or <|endoftext|> without ChatML), <|endoftext|> separates documents."""
  special = {}
  eos_text = IM_END if IM_END in index else EOS if EOS in index else None
  if eos_text is not None:
    special["eos"] = special["eot"] = index[eos_text]
  if EOS in index:
    special["bos"] = index[EOS]  # Qwen's convention: a bos that is never added (add_bos false)
  if unk is not None:
    special["unk"] = unk
  stops = [t for t in (IM_END, EOS) if t in index]
  return special, stops


def from_sentencepiece(path: str, pad_id: int) -> Vocab:
  proto = sp_to_hf.load_proto(path)
  trainer, norm = proto.trainer_spec, proto.normalizer_spec
  if trainer.model_type != _SP_BPE:
    raise Unsupported(f"{path}: SentencePiece model_type {trainer.model_type} (1 = unigram) is not "
                      "BPE; llama.cpp's SentencePiece tokenizer merges pieces by score (BPE) and "
                      "would segment a unigram model's text differently")
  if norm.precompiled_charsmap:
    raise Unsupported(f"{path}: normalizer {norm.name!r} rewrites text before encoding; "
                      "llama.cpp's SentencePiece tokenizer does not normalise (only 'identity' exports)")
  if norm.remove_extra_whitespaces:
    raise Unsupported(f"{path}: remove_extra_whitespaces=true collapses spaces; llama.cpp's "
                      "SentencePiece tokenizer keeps them")
  if trainer.treat_whitespace_as_suffix or not norm.escape_whitespaces:
    raise Unsupported(f"{path}: treat_whitespace_as_suffix / escape_whitespaces=false are not "
                      "supported by llama.cpp")
  tokens = [p.piece for p in proto.pieces]
  types = [int(p.type) for p in proto.pieces]
  index = {t: i for i, t in enumerate(tokens)}
  special, stops = _chat_ids(index, trainer.unk_id if trainer.unk_id >= 0 else None)
  special["pad"] = pad_id
  return Vocab(model="llama", pre=None, tokens=tokens, types=types,
               scores=[float(p.score) for p in proto.pieces], merges=None,
               add_space_prefix=bool(norm.add_dummy_prefix), special=special, stops=stops)


def _split_regex(pre: dict | None, source: str) -> str:
  """The split regex of a byte-level pre-tokenizer (Qwen2: Split then ByteLevel without regex)."""
  if not pre:
    raise Unsupported(f"{source}: no pre_tokenizer; only byte-level BPE tokenizers export")
  steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
  kinds = [s.get("type") for s in steps]
  if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
    pattern = steps[0].get("pattern") or {}
    if "Regex" in pattern and steps[0].get("behavior") == "Isolated" \
        and not steps[0].get("invert") and not steps[1].get("add_prefix_space"):
      return pattern["Regex"]
  raise Unsupported(f"{source}: pre_tokenizer {kinds} is not one llama.cpp reproduces (supported: "
                    "Split with the Qwen2 or Llama 3 regex, then ByteLevel without its own regex)")


def from_tokenizer_json(path: str, pad_id: int) -> Vocab:
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  file = os.path.join(directory, "tokenizer.json")
  with open(file, encoding="utf-8") as f:
    tj = json.load(f)
  model = tj.get("model") or {}
  if model.get("type") != "BPE":
    raise Unsupported(f"{file}: model type {model.get('type')!r} is not supported (only byte-level "
                      "BPE tokenizer.json exports; a SentencePiece run keeps its tokenizer.model)")
  if tj.get("normalizer") and tj["normalizer"].get("type") != "NFC":
    raise Unsupported(f"{file}: normalizer {tj['normalizer'].get('type')!r} is not supported by "
                      "llama.cpp's BPE tokenizer")
  regex = _split_regex(tj.get("pre_tokenizer"), file)
  if regex not in BPE_PRE:
    raise Unsupported(f"{file}: split regex {regex!r} is not one llama.cpp names (known: Qwen2's "
                      "and Llama 3's)")
  index = dict(model["vocab"])
  added = {a["content"]: a for a in tj.get("added_tokens", [])}
  for text, a in added.items():
    index[text] = a["id"]
  n = max(index.values()) + 1
  tokens, types = [f"[PAD{i}]" for i in range(n)], [UNUSED] * n
  for text, i in index.items():
    tokens[i] = text
    a = added.get(text)
    types[i] = NORMAL if a is None else CONTROL if a.get("special") else USER_DEFINED
  merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
  special, stops = _chat_ids(index)
  special["pad"] = pad_id
  return Vocab(model="gpt2", pre=BPE_PRE[regex], tokens=tokens, types=types, scores=None,
               merges=merges, add_space_prefix=False, special=special, stops=stops)


def from_run_tokenizer(path: str, pad_id: int) -> Vocab:
  """The Vocab of the tokenizer at `path` (a .model file, or a directory with tokenizer.json or
  tokenizer.model), refused with Unsupported where llama.cpp would encode differently."""
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
      return from_tokenizer_json(path, pad_id)
    path = os.path.join(path, MODEL_FILE)
  if os.path.basename(path) == "tokenizer.json":
    return from_tokenizer_json(path, pad_id)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer {path!r} not found")
  return from_sentencepiece(path, pad_id)



