"""infer/text.py against references that decode or search the whole text at once: the incremental
Detokenizer (tokens that split UTF-8 characters, as byte-level BPE does) and the StopMatcher
(stop strings spanning deltas, held-back tails)."""

import random

import pytest

from llm_jax.infer.text import Detokenizer, StopMatcher

ALPHABET = ["a", "b", " ", "\n", "é", "你", "好", "😀"]


def _byte_tokens(rng, text):
  """`text` cut into random byte pieces (some end inside a character, some span several): the
  pieces and a decode function over their ids."""
  data, pieces, k = text.encode("utf-8"), [], 0
  while k < len(data):
    n = rng.randint(1, 5)
    pieces.append(data[k:k + n])
    k += n
  decode = lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")
  return list(range(len(pieces))), decode


@pytest.mark.parametrize("seed", range(40))
def test_detokenizer_deltas_are_the_whole_decode(seed):
  rng = random.Random(seed)
  text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))
  ids, decode = _byte_tokens(rng, text)
  detok, deltas = Detokenizer(decode), []
  for k, i in enumerate(ids):
    deltas.append(detok.add(i))
    so_far = decode(ids[:k + 1])
    # Never a replacement character, and always a prefix of what the ids so far decode to.
    assert "\ufffd" not in detok.text and so_far.startswith(detok.text)
  assert "".join(deltas) == detok.text
  detok.finish()
  assert detok.text == text


def test_detokenizer_context_is_not_emitted():
  pieces = ["x", "y", " z", "é".encode()[:1], "é".encode()[1:]]
  decode = lambda ids: b"".join(p if isinstance(p, bytes) else p.encode() for p in (pieces[i] for i in ids)
                                ).decode("utf-8", errors="replace")
  detok = Detokenizer(decode, context=[0, 1])
  assert [detok.add(i) for i in (2, 3, 4)] == [" z", "", "é"]
  assert detok.text == " zé" and detok.finish() == ""


def _first_stop(text, stops):
  hits = [text.find(x) for x in stops if x and x in text]
  return min(hits) if hits else None


def _certain_reference(text, stops):
  """The shortest cut before which nothing can become part of a stop string: the earliest start
  of a whole stop string, else of a tail that a stop string begins with."""
  for i in range(len(text) + 1):
    tail = text[i:]
    if any(x and (tail.startswith(x) or (x.startswith(tail) and tail)) for x in stops):
      return i
  return len(text)


@pytest.mark.parametrize("seed", range(60))
def test_stop_matcher_against_searching_the_whole_text(seed):
  rng = random.Random(seed)
  word = lambda: "".join(rng.choice("ab\n") for _ in range(rng.randint(0, 4)))
  stops = [word() for _ in range(rng.randint(1, 3))]  # empty ones are ignored
  full = "".join(rng.choice("ab\n") for _ in range(rng.randint(0, 30)))
  matcher, shown, emitted, stopped = StopMatcher(stops), [], 0, False
  cut = 0
  while cut < len(full) and not stopped:
    cut = min(len(full), cut + rng.randint(0, 3))  # a delta of 0-3 characters
    text = full[:cut]
    want = _first_stop(text, stops)
    assert matcher.find(text) == want
    end = matcher.certain(text)
    assert end == (want if want is not None else _certain_reference(text, stops))
    end = max(end, emitted)
    shown.append(text[emitted:end])
    emitted, stopped = end, want is not None
  if not stopped:
    shown.append(full[emitted:matcher.certain(full, final=True)])
  # The streamed text is the whole text cut before its first stop string: no stop string shown.
  first = _first_stop(full, stops)
  assert "".join(shown) == (full if first is None else full[:first])


def test_stop_matcher_finds_a_stop_spanning_deltas_once():
  m = StopMatcher(["<end>", "", "nd>x"])
  assert m.find("ab<e") is None and m.certain("ab<e") == 2
  assert m.find("ab<end") is None and m.certain("ab<end") == 2
  assert m.find("ab<end>") == 2 and m.at == 2
  assert m.find("ab<end>nd>x") == 2  # the first one found stays
  assert StopMatcher().certain("abc") == 3
