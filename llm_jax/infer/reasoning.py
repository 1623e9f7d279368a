"""Showing or hiding the reasoning of replies shaped `<think>reasoning</think>answer` (models
trained with configs/distill.py, Qwen3, DeepSeek-R1 distills), in the chat CLI and one-shot
generation. The format itself (join, split) is llm_jax/data/reasoning.py.

  shown    the reply as generated, reasoning first
  hidden   the answer only; while a streamed reply reasons, "[thinking] " is printed once
One-shot records always carry the reasoning in a separate "reasoning" field; "answer" holds the
answer alone when hidden, the whole reply when shown.
"""

from typing import Callable

from llm_jax.data.reasoning import split
from llm_jax.data.tokenizer import END_THINK, THINK

THINKING = "[thinking] "


class StreamFilter:
  """A text writer for one streamed reply that drops its think block (when `show` is False)."""

  def __init__(self, write: Callable[[str], None], show: bool = False):
    self._write, self._show = write, show
    self._text, self._pos, self._state = "", 0, "start"  # start | thinking | after | answer

  def __call__(self, delta: str) -> None:
    if self._show:
      self._write(delta)
      return
    self._text += delta
    if self._state == "start":
      head = self._text.lstrip()
      if head.startswith(THINK):
        self._state, self._pos = "thinking", self._text.index(THINK) + len(THINK)
        self._write(THINKING)
      elif THINK.startswith(head):
        return  # still empty, or a prefix of "<think>": wait for more
      else:
        self._state = "answer"
    if self._state == "thinking":
      end = self._text.find(END_THINK, self._pos)
      if end < 0:
        return
      self._state, self._pos = "after", end + len(END_THINK)
    if self._state == "after":  # the newlines between </think> and the answer are not shown
      rest = self._text[self._pos:].lstrip("\n")
      if not rest:
        return
      self._state, self._pos = "answer", len(self._text) - len(rest)
    self._write(self._text[self._pos:])
    self._pos = len(self._text)


class _HidingSession:
  """A ChatSession whose streamed replies hide their reasoning; everything else is the session's
  (the history keeps the whole reply)."""

  def __init__(self, session):
    self._session = session

  def __getattr__(self, name):
    return getattr(self._session, name)

  def reply(self, user_text: str, write: Callable[[str], None] | None = None, **kwargs):
    return self._session.reply(user_text, write=StreamFilter(write) if write else None, **kwargs)


def wrap_session(session, show: bool):
  """The chat session as the CLI should stream it (`--show_reasoning`)."""
  return session if show else _HidingSession(session)


def split_answers(records: list[dict], show: bool) -> list[dict]:
  """One-shot answers: the reasoning moved to a "reasoning" field, and cut from "answer" unless
  `show`."""
  out = []
  for rec in records:
    reasoning, answer = split(rec["answer"])
    if reasoning is not None:
      rec = {**rec, "reasoning": reasoning, "answer": rec["answer"] if show else answer}
    out.append(rec)
  return out
