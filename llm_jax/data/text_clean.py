"""Pretraining text hygiene, from course projects that trained on Chinese Wikipedia dumps.

Extracted wiki text is full of brackets whose content was a stripped template ("《战国无双3》（）
是...") and leftover markup; and paragraphs can be far longer than a block. `clean_markup`
removes both; `cut_at_sentences` splits an over-long document after a sentence end so that no
piece starts or stops mid-sentence unless a single sentence is itself too long.
"""

from __future__ import annotations

import re

_WIKI_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]")  # [[target|label]] -> label
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")  # {{cite ...}}
_REF = re.compile(r"<ref[^>]*?/>|<ref[^>]*>.*?</ref>", re.S)
_HTML_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(?:\s[^<>]*)?/?>")
_BOLD_ITALIC = re.compile(r"'{2,}")
_ENTITY = {"&nbsp;": " ", "&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": '"'}
# Brackets holding nothing but spaces and punctuation: （）, (；), 【 】, 「」 ...
_EMPTY_BRACKETS = re.compile(
    r"[（(\[【「『〔][\s,，;；、:：.。·\-—_/]*[）)\]】」』〕]")


def clean_markup(text: str) -> str:
  """Removes wiki/HTML markup and empty brackets; keeps the visible text."""
  text = _REF.sub("", text)
  text = _TEMPLATE.sub("", text)
  text = _WIKI_LINK.sub(r"\1", text)
  text = _HTML_TAG.sub("", text)
  text = _BOLD_ITALIC.sub("", text)
  for entity, char in _ENTITY.items():
    text = text.replace(entity, char)
  previous = None
  while previous != text:  # "（（））" empties in two rounds
    previous, text = text, _EMPTY_BRACKETS.sub("", text)
  return re.sub(r"[ \t]{2,}", " ", text).strip()


def cut_at_sentences(text: str, max_chars: int, sentence_ends: str = "。！？.!?") -> list[str]:
  """Splits `text` into pieces of at most max_chars, each ending at a sentence end if one exists
  in the window (closing quotes/brackets right after the end stay with their sentence).
  A single sentence longer than max_chars is cut hard at max_chars."""
  if max_chars <= 0 or len(text) <= max_chars:
    return [text]
  closers = "”’\"')）」』]】"
  pieces, start = [], 0
  while len(text) - start > max_chars:
    window = text[start:start + max_chars]
    cut = -1
    for k in range(len(window) - 1, -1, -1):
      if window[k] in sentence_ends:
        # A period between digits (3.14) or letters (e.g.) is not a sentence end.
        nxt = text[start + k + 1] if start + k + 1 < len(text) else " "
        if window[k] == "." and not (nxt.isspace() or nxt in closers):
          continue
        cut = k + 1
        while cut < len(window) and window[cut] in closers:
          cut += 1
        break
    if cut <= 0:
      cut = max_chars
    pieces.append(text[start:start + cut])
    start += cut
    while start < len(text) and text[start] in " \t\n":  # the next piece starts at a word
      start += 1
  if start < len(text):
    pieces.append(text[start:])
  return [p for p in pieces if p.strip()]
