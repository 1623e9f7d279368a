"""Text <-> tokens for the server: raw prompts with special tokens, printable token strings for
log-probs, prompt text with token offsets (incremental detokenization is llm_jax.infer.text's).

Chat message content goes through `llm_jax.infer.session.prompt_ids` (special-token text typed by a
user stays text, so nobody can forge a turn). A raw `/v1/completions` prompt or `/tokenize` text is
different: it is the model's input written out, as vLLM and llama.cpp take it, so
"<|im_start|>user\\n...<|im_end|>" there becomes the control ids the model was trained on.
"""

from __future__ import annotations

import re

from llm_jax.infer.text import Detokenizer

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def special_tokens(tok) -> dict[str, int]:
  """Text -> id of the tokenizer's ChatML / end-of-text / BOS tokens that it has."""
  out = {}
  for attr in ("eos_id", "im_start_id", "im_end_id", "bos_id"):
    i = getattr(tok, attr, None)
    if i is not None:
      out[tok.id_to_token(i)] = int(i)
  return out


def encode_raw(tok, text: str) -> list[int]:
  """Ids of `text` where the special tokens' text becomes their ids (everything else: tok.encode)."""
  specials = special_tokens(tok)
  if not specials or not any(s in text for s in specials):
    return tok.encode(text)
  pattern = re.compile("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")
  ids: list[int] = []
  for k, part in enumerate(pattern.split(text)):
    if k % 2:
      ids.append(specials[part])
    elif part:
      ids.extend(tok.encode(part))
  return ids


def token_bytes(tok, i: int) -> bytes:
  """The UTF-8 bytes token `i` stands for (a byte-fallback piece is its one byte)."""
  piece = tok.id_to_token(i)
  m = _BYTE_PIECE.match(piece or "")
  if m:
    return bytes([int(m.group(1), 16)])
  text = tok.decode([i])
  if "\ufffd" in text and piece:  # a partial character of a byte-level BPE: its raw piece is unique
    return piece.encode("utf-8")
  return text.encode("utf-8")


def token_str(tok, i: int) -> str:
  """A readable, unique string for token `i` (OpenAI's convention): its text, or "bytes:\\xNN" for
  a byte that is only part of a UTF-8 character."""
  b = token_bytes(tok, i)
  try:
    return b.decode("utf-8")
  except UnicodeDecodeError:
    return "bytes:" + "".join(f"\\x{c:02x}" for c in b)


def prompt_offsets(tok, ids: list[int]) -> tuple[str, list[int]]:
  """(text of `ids`, character offset where each token's text starts in it)."""
  d = Detokenizer(tok.decode)
  offsets = []
  for i in ids:
    offsets.append(len(d.text))
    d.add(i)
  d.finish()
  return d.text, offsets
