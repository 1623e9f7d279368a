"""A Hugging Face `tokenizer.json` behind llm_jax's tokenizer interface (see tokenizer.py).

  tok = HFTokenizer("runs/qwen/tokenizer")      # a directory holding tokenizer.json, or the file

Special ids come from the added tokens and, where present, tokenizer_config.json:
  eos_id       <|endoftext|> (the end-of-document token we pack with); else tokenizer_config's
               eos_token; else </s> or <|end_of_text|>.
  pad_id       tokenizer_config's pad_token; else <pad>, <|endoftext|>, eos; else 0. Padding is
               masked by segment_ids = 0, so any id works; this only picks a readable one.
  im_start_id, im_end_id   <|im_start|> / <|im_end|>, or None when the vocabulary has no ChatML
               tokens (a Llama tokenizer). Nothing is invented in their place: pretraining and
               plain-text jobs work, and chat jobs fail in `require_chat_tokens()` with a message
               saying how to fix it.
`encode` never turns special-token text inside user strings into special ids (we set
`encode_special_tokens`, which makes the `tokenizers` library split special added tokens like
ordinary text; non-special added tokens such as Qwen3's <think> still match, as they should).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from tokenizers import Tokenizer as _HFTokenizer

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"


def _token_text(t) -> str | None:
  """tokenizer_config.json writes special tokens as "text" or {"content": "text", ...}."""
  if isinstance(t, dict):
    return t.get("content")
  return t if isinstance(t, str) else None


class HFTokenizer:
  """llm_jax Tokenizer interface over a `tokenizers.Tokenizer` loaded from tokenizer.json."""

  def __init__(self, path: str):
    if os.path.isdir(path):
      directory, file = path, os.path.join(path, TOKENIZER_JSON)
    else:
      directory, file = os.path.dirname(path), path
    if not os.path.isfile(file):
      raise FileNotFoundError(f"{file} not found: config.data.tokenizer.path must be a "
                              "tokenizer.json or a directory holding one")
    with open(file, encoding="utf-8") as f:
      self._json = f.read()
    config_file = os.path.join(directory, TOKENIZER_CONFIG)
    self._config_text = None
    if os.path.isfile(config_file):
      with open(config_file, encoding="utf-8") as f:
        self._config_text = f.read()
    self.source = file
    self._setup()

  def _setup(self) -> None:
    self._tok = _HFTokenizer.from_str(self._json)
    self._tok.encode_special_tokens = True  # user text never yields special ids (not serialised)
    config = json.loads(self._config_text) if self._config_text else {}
    vocab = self._tok.get_vocab(with_added_tokens=True)
    # The model-facing size: ids may have holes (added tokens at fixed ids), so max id + 1.
    self.vocab_size = max(vocab.values()) + 1

    def first(*names):
      for n in names:
        if n is not None and n in vocab:
          return vocab[n]
      return None

    self.eos_id = first(EOS, _token_text(config.get("eos_token")), "</s>", "<|end_of_text|>")
    pad = first(_token_text(config.get("pad_token")), "<pad>", EOS)
    self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
    self.im_start_id = first(IM_START)
    self.im_end_id = first(IM_END)
    self.bos_id = first(_token_text(config.get("bos_token")))  # never added by encode

  def __getstate__(self):  # grain worker processes receive the tokenizer by pickling
    return {"json": self._json, "config": self._config_text, "source": self.source}

  def __setstate__(self, state):
    self._json, self._config_text, self.source = state["json"], state["config"], state["source"]
    self._setup()

  @property
  def chat_template(self) -> str | None:
    """The Jinja chat template of tokenizer_config.json, if any (informational)."""
    return json.loads(self._config_text).get("chat_template") if self._config_text else None

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; no BOS/EOS; special-token text in `text` stays ordinary text."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, special tokens rendered as their text (e.g. "<|im_end|>")."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def token_to_id(self, piece: str) -> int:
    i = self._tok.token_to_id(piece)
    if i is None:
      raise KeyError(f"token {piece!r} is not in the vocabulary of {self.source}")
    return i

  def id_to_token(self, i: int) -> str:
    return self._tok.id_to_token(int(i))

  def require_chat_tokens(self) -> None:
    missing = [p for p, i in ((IM_START, self.im_start_id), (IM_END, self.im_end_id)) if i is None]
    if missing:
      raise ValueError(
          f"tokenizer {self.source} has no {missing} token(s), so it cannot render ChatML "
          "conversations (Llama tokenizers have none). Use a ChatML tokenizer (Qwen's, or train "
          "one with config.data.tokenizer.path=''), or add the tokens to tokenizer.json's "
          "added_tokens and grow the model's vocabulary to match.")

  def save(self, directory: str) -> str:
    """Writes tokenizer.json (and tokenizer_config.json) into `directory`; returns it."""
    os.makedirs(directory, exist_ok=True)
    files = [(TOKENIZER_JSON, self._json), (TOKENIZER_CONFIG, self._config_text)]
    for name, text in files:
      if text is None:
        continue
      tmp = os.path.join(directory, f".{name}.tmp")
      with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
      os.replace(tmp, os.path.join(directory, name))  # readers never see half a file
    return directory
