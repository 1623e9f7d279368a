"""Fitting a prompt and its answer into a model's context window, and saying what was cut.

A run has a context length (rundir.context_length: the longest sequence its weights were trained
on, or an imported model's max_position_embeddings). Prompt + answer must fit in it; positions
beyond what the model saw in training produce garbage, silently. The rules, in order:

  1. The current question is kept whole, and so is the system prompt when there is room.
  2. Earlier exchanges are kept, newest first, while the answer still gets its reserve:
     min(max_new_tokens, context // 2) tokens.
  3. The answer gets what is left: min(max_new_tokens, context - prompt), at least 1 token.
  4. Only a question that cannot fit at all (with a quarter of the context kept for the
     answer) is cut, from the left: its end (usually the question proper) is kept.

Every cut is reported in `FittedPrompt.notes()`, which chat prints and the prompts file records;
the answer's cap only when it cut the answer.
"""

import dataclasses

from llm_jax.data.chat_template import encode_chat


@dataclasses.dataclass(frozen=True)
class FittedPrompt:
  ids: list[int]  # the prompt's token ids
  max_new_tokens: int  # the answer's budget: min(requested, context - len(ids))
  requested_new_tokens: int  # what the caller asked for
  context: int  # the run's context length
  dropped_messages: int = 0  # earlier messages (user + assistant turns, system) left out
  cut_tokens: int = 0  # tokens cut from the left of the last message (or of a raw prompt)

  @property
  def answer_capped(self) -> bool:
    return self.max_new_tokens < self.requested_new_tokens

  def notes(self, finish_reason: str | None = None) -> list[str]:
    """What the fit changed, for the user: prompt tokens cut and messages left out, and, once the
    answer is known, whether the context's cap cut it (finish_reason "length"). An answer that
    ended by itself under a cap was not changed by it: no note."""
    out = []
    if self.cut_tokens:
      out.append(f"the prompt is longer than the {self.context}-token context: its first "
                 f"{self.cut_tokens} tokens were cut")
    if self.dropped_messages:
      out.append(f"{self.dropped_messages} earlier message(s) left out to fit the "
                 f"{self.context}-token context")
    if self.answer_capped and finish_reason == "length":
      out.append(f"the answer was cut at {self.max_new_tokens} tokens: the prompt takes "
                 f"{len(self.ids)} of the {self.context}-token context")
    return out


def _reserve(context: int, max_new_tokens: int, share: int) -> int:
  return max(1, min(max_new_tokens, context // share))


def fit_chat(tok, messages: list[dict], context: int, max_new_tokens: int) -> FittedPrompt:
  """ChatML prompt ids of `messages` (the last one is the new user turn) fitted to `context`."""
  if not messages:
    raise ValueError("fit_chat needs at least one message")
  system = messages[:1] if messages[0]["role"] == "system" else []
  history, last = messages[len(system):-1], messages[-1]
  reserve = _reserve(context, max_new_tokens, 2)

  def ids_of(msgs):
    return encode_chat(tok, msgs, add_generation_prompt=True, where="chat prompt")[0].tolist()

  # Rule 2: drop whole earlier exchanges, oldest first, until the answer's reserve fits (a kept
  # history always starts at a user turn).
  starts = [i for i, m in enumerate(history) if m["role"] == "user"] + [len(history)]
  for start in starts:
    ids = ids_of(system + history[start:] + [last])
    if len(ids) + reserve <= context:
      return _fitted(ids, max_new_tokens, context, dropped=start)
  # No history left. Rule 1/3: keep the question whole if it fits at all.
  ids = ids_of(system + [last])
  dropped = len(history)
  if len(ids) < context:
    return _fitted(ids, max_new_tokens, context, dropped=dropped)
  if system:  # the system prompt goes before the question is cut
    ids, system, dropped = ids_of([last]), [], dropped + 1
    if len(ids) < context:
      return _fitted(ids, max_new_tokens, context, dropped=dropped)
  # Rule 4: cut the question's content from the left.
  frame = len(ids_of([{**last, "content": ""}]))
  content_ids = tok.encode(last["content"])
  keep = context - _reserve(context, max_new_tokens, 4) - frame
  if keep <= 0:
    raise ValueError(f"the {context}-token context cannot hold even an empty chat turn "
                     f"({frame} tokens)")
  cut = len(content_ids) - keep
  ids = ids_of([{**last, "content": tok.decode(content_ids[cut:])}])
  # Re-encoding the decoded tail can merge pieces differently; trim to the budget exactly.
  if len(ids) > context - 1:
    ids = ids[len(ids) - (context - 1):]
  return _fitted(ids, max_new_tokens, context, dropped=dropped, cut=cut)


def fit_text(tok, text: str, context: int, max_new_tokens: int) -> FittedPrompt:
  """Plain-text (raw completion) prompt ids fitted to `context`: cut from the left if too long."""
  ids = tok.encode(text)
  if not ids:
    raise ValueError("the prompt is empty")
  return fit_ids(ids, context, max_new_tokens)


def fit_ids(ids, context: int, max_new_tokens: int) -> FittedPrompt:
  """Prompt ids fitted to `context` as they are: cut from the left if too long (rule 4)."""
  ids = list(ids)
  cut = 0
  if len(ids) >= context:
    keep = context - _reserve(context, max_new_tokens, 4)
    cut, ids = len(ids) - keep, ids[len(ids) - keep:]
  return _fitted(ids, max_new_tokens, context, cut=cut)


def _fitted(ids, max_new_tokens, context, dropped=0, cut=0) -> FittedPrompt:
  return FittedPrompt(ids=list(ids), max_new_tokens=max(1, min(max_new_tokens, context - len(ids))),
                      requested_new_tokens=max_new_tokens, context=context,
                      dropped_messages=dropped, cut_tokens=cut)
