"""Prompt sets of online RL (GRPO): records that ask, with the fields their rewards check.

A record is a JSON object, one per line of a .jsonl file, with
  "prompt": "the user's question"                     (a single user turn), or
  "messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]  (ending on a user turn)
plus any other fields (e.g. "answer"), which reach the reward functions as keyword arguments.
`builtin:<name>` takes an embedded set (data/builtin: arith_train, arith_heldout).

Every prompt is encoded with the chat template and its generation prompt once, at the start, and
one longer than `max_prompt_tokens` (the row length minus max_new_tokens) stops the job with its
file, line and length: a prompt is never cut silently.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from llm_jax.data import builtin, chat_template, formats
from llm_jax.data.sources import read_records

HINT = ('each line is {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}]} '
        'plus the fields your rewards read, e.g. "answer"')


@dataclasses.dataclass
class PromptSet:
  ids: list[np.ndarray]  # each prompt's token ids, chat template and generation prompt included
  records: list[dict]  # the records as read (fields for the rewards)
  where: list[str]  # "file:line" (or "builtin:name #i") of each record, for messages
  texts: list[str]  # each prompt as the reward functions see it (the last user turn's text)


def _messages(rec: dict, where: str) -> list[dict]:
  if "prompt" in rec:
    if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
      raise ValueError(f"{where}: field 'prompt' must be a non-empty string; {HINT}")
    return [{"role": "user", "content": rec["prompt"]}]
  if "messages" in rec:
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
      raise ValueError(f"{where}: field 'messages' must be a non-empty list; {HINT}")
    out = []
    for k, m in enumerate(msgs):
      if not isinstance(m, dict) or not isinstance(m.get("content"), str):
        raise ValueError(f"{where}: field 'messages'[{k}] needs a string 'content'; {HINT}")
      role = formats.ROLES.get(m.get("role"), m.get("role"))
      if role not in ("system", "user", "assistant"):
        raise ValueError(f"{where}: field 'messages'[{k}] has role {m.get('role')!r}; use "
                         "system, user or assistant")
      out.append({"role": role, "content": m["content"]})
    if out[-1]["role"] != "user":
      raise ValueError(f"{where}: field 'messages' must end on a user turn (the model answers "
                       f"it), ends on {out[-1]['role']!r}")
    return out
  raise ValueError(f"{where}: no 'prompt' or 'messages' field (fields: {sorted(rec)}); {HINT}")


def records(spec: str, field: str = "config.grpo.prompts") -> list[tuple[str, dict]]:
  """(where, record) of every record of the comma-separated sources in `spec`."""
  out = []
  for path in (p.strip() for p in spec.split(",")):
    if not path:
      continue
    if builtin.is_builtin(path):
      out += [(f"{path} #{i + 1}", r) for i, r in enumerate(builtin.records(path, None, field))]
    elif path.endswith(".jsonl"):
      out += list(read_records(path, HINT))
    else:
      raise ValueError(f"{field}: {path!r} is neither a .jsonl file nor builtin:<name>")
  if not out:
    raise ValueError(f"{field}={spec!r} names no prompts")
  return out


def load(spec: str, tok, max_prompt_tokens: int, field: str = "config.grpo.prompts") -> PromptSet:
  """Reads and encodes a prompt set; a prompt over `max_prompt_tokens` tokens is an error."""
  return encode(records(spec, field), tok, max_prompt_tokens)


def encode(located: list[tuple[str, dict]], tok, max_prompt_tokens: int) -> PromptSet:
  """The PromptSet of (where, record) pairs (see `load`)."""
  ids, recs, wheres, texts = [], [], [], []
  for where, rec in located:
    msgs = _messages(rec, where)
    enc, _ = chat_template.encode_chat(tok, msgs, add_generation_prompt=True, where=where)
    if len(enc) > max_prompt_tokens:
      raise ValueError(
          f"{where}: the prompt is {len(enc)} tokens, over the {max_prompt_tokens} that fit "
          "(config.data.seq_len - config.grpo.max_new_tokens); shorten it, raise "
          "config.data.seq_len or lower config.grpo.max_new_tokens. Prompts are never cut.")
    ids.append(enc)
    recs.append(rec)
    wheres.append(where)
    texts.append(msgs[-1]["content"])
  return PromptSet(ids, recs, wheres, texts)
