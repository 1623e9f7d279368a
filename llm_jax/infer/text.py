"""Text out of a token stream: an incremental detokenizer and a stop-string matcher, each O(1)
tokens of decoding (and O(new text) of searching) per token.

  detok, stops = Detokenizer(tok.decode), StopMatcher(["\\n\\n"])
  for token in tokens:
    detok.add(token)
    end = stops.certain(detok.text)  # detok.text[:end] is final; stops.at: where a stop begins

Used by `infer.generate` (stop strings), `infer.session` (streaming to the terminal) and
`serve.scheduler` (streamed deltas that never show a stop string or the start of one).
"""

from __future__ import annotations

from typing import Callable, Iterable


class Detokenizer:
  """Incremental decoding in O(1) tokens per step (vLLM's prefix/read offsets).

  `add(id)` returns the new text (maybe "") and appends it to `text`. A token that ends inside a
  multi-byte character is held back until the character completes. The concatenated deltas equal
  `decode(all ids)` for tokenizers whose decoding is concatenative at character boundaries
  (SentencePiece, byte-level BPE); `finish()` returns any remainder otherwise.
  """

  def __init__(self, decode: Callable[[list[int]], str], context: list[int] | None = None):
    self.decode = decode
    self.ids: list[int] = list(context or [])
    # A few tokens of context before the first new token keep decoding of e.g. a leading space
    # right; that context is never emitted.
    self.prefix = max(0, len(self.ids) - 4)
    self.read = len(self.ids)
    self.start = self.read
    self.text = ""

  def add(self, i: int) -> str:
    self.ids.append(int(i))
    before = self.decode(self.ids[self.prefix:self.read])
    now = self.decode(self.ids[self.prefix:])
    if len(now) > len(before) and not now.endswith("\ufffd") and now.startswith(before):
      delta = now[len(before):]
      self.prefix, self.read = self.read, len(self.ids)
      self.text += delta
      return delta
    return ""

  def finish(self) -> str:
    """Text not yet returned (held-back bytes at the end, or a tokenizer's non-local decoding),
    appended to `text`. Decodes every id once."""
    full = self.decode(self.ids[self.start:])
    if full.startswith(self.text) and len(full) > len(self.text):
      delta = full[len(self.text):]
      self.text = full
      return delta
    return ""


def whole_character_prefix(decode: Callable[[list[int]], str], ids: list[int], n: int) -> int:
  """The longest length <= n of a prefix of `ids` that ends at a character boundary: a byte-level
  or byte-fallback token sequence cut after n tokens can end inside a multi-byte character (a
  Chinese character is three UTF-8 bytes), which decodes as U+FFFD. At most 3 tokens are given
  back (a character has at most 4 bytes); a prefix that still ends in U+FFFD (the text itself
  holds one) is left at n."""
  n = min(n, len(ids))
  for k in range(n, max(n - 4, 0), -1):
    if not decode(list(ids[:k])).endswith("\ufffd"):
      return k
  return n


class StopMatcher:
  """Stop strings in a text that only grows at its end (an answer being generated).

  `find(text)` returns where the first stop string begins (`at`), searching only where one could
  have been completed since the last call. `certain(text)` is how much of the text may be shown
  now: up to the stop string, or else all but the longest tail that could still become one.
  Empty stop strings are ignored. Each call costs O(new text x stop strings): the longest tail that
  begins a stop string is tracked character by character (Knuth-Morris-Pratt), never searched again.
  """

  def __init__(self, stops: Iterable[str] = ()):
    self.stops = tuple(x for x in stops if x)
    self.longest = max((len(x) for x in self.stops), default=0)
    self.at: int | None = None  # where the first stop string begins, once found
    self._searched = 0  # length of the text the last search saw
    self._borders = [_borders(x) for x in self.stops]
    self._tails = [0] * len(self.stops)  # per stop: the longest prefix of it that the text ends with

  def find(self, text: str) -> int | None:
    if self.at is None and self.stops and len(text) > self._searched:
      # An occurrence not seen before ends in the new text, so it begins at lo or after.
      lo = max(0, self._searched - self.longest + 1)
      hits = [i for i in (text.find(x, lo) for x in self.stops) if i >= 0]
      if hits:
        self.at = min(hits)
      self._advance(text[self._searched:])
      self._searched = len(text)
    return self.at

  def certain(self, text: str, final: bool = False) -> int:
    """Length of the prefix of `text` that is certain: before the first stop string; else all of
    it when `final` (no more tokens come), otherwise all but a tail that is a proper prefix of a
    stop string."""
    at = self.find(text)
    if at is not None:
      return at
    return len(text) if final else len(text) - self._held_back()

  def _advance(self, new: str) -> None:
    for k, x in enumerate(self.stops):
      borders, q, n = self._borders[k], self._tails[k], len(x)
      for c in new:
        while q and (q == n or x[q] != c):
          q = borders[q - 1]
        if x[q] == c:
          q += 1
      self._tails[k] = q

  def _held_back(self) -> int:
    """Length of the longest tail of the text that is a proper prefix of a stop string."""
    return max((min(q, len(x) - 1) for q, x in zip(self._tails, self.stops)), default=0)


def _borders(x: str) -> list[int]:
  """KMP's failure function: borders[i] is the length of the longest proper prefix of x[:i + 1]
  that is also its suffix."""
  borders, k = [0] * len(x), 0
  for i in range(1, len(x)):
    while k and x[i] != x[k]:
      k = borders[k - 1]
    if x[i] == x[k]:
      k += 1
    borders[i] = k
  return borders
