"""Record shapes users bring, normalised to `{"text": str}` or `{"messages": [{role, content}]}`.

  text      a plain string, or a JSON object with the configured text field (a string, or a
            list of strings joined by newlines: chinese-poetry's `paragraphs`)
  chat      OpenAI/minimind `{"messages"|"conversations": [{"role", "content"}]}` or ShareGPT
            `{"conversations": [{"from", "value"}]}` (human/gpt/system), optional `"system"` key;
            with roles="alternate", turns without roles (KdConv's `{"message": ...}`, plain
            strings) alternate user, assistant, user, ...
  alpaca    `{"instruction", "input"?, "output", "system"?, "history"?: [[query, answer], ...]}`
  pair      a preference pair `{"prompt"?, "chosen", "rejected", ...}` (see preference.py),
            including hh-rlhf's transcripts "\n\nHuman: ...\n\nAssistant: ..."

An assistant turn's `reasoning_content` (OpenAI / Qwen3 style) is joined into its content as
"<think>reasoning</think>answer" (see reasoning.py).
"""

from __future__ import annotations

import re
from typing import Any

from llm_jax.data import reasoning
from llm_jax.data.sources import RecordError

FORMATS = ("auto", "text", "chat", "sharegpt", "alpaca", "pair")
ROLE_MODES = ("given", "alternate")  # config.data.roles
ROLES = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
}


def detect_format(record: Any, text_field: str, where: str) -> str:
  """The format of a source, decided from its first record."""
  if isinstance(record, str):
    return "text"
  if not isinstance(record, dict):
    raise RecordError(f"{where}: a record is a {type(record).__name__}; expected a JSON object "
                      "or a line of text.")
  if text_field in record:
    return "text"
  if "chosen" in record and "rejected" in record:  # before chat: ShareGPT pairs have both
    return "pair"
  if "messages" in record or "conversations" in record:
    return "chat"
  if "instruction" in record and "output" in record:
    return "alpaca"
  raise RecordError(
      f"{where}: cannot tell the record format from its keys {sorted(record)}; expected "
      f"{text_field!r} (text, see config.data.text_field), 'messages'/'conversations' (chat) or "
      "'instruction'+'output' (Alpaca). Set config.data.text_field or config.data.format.")


def rename_fields(spec: str) -> dict[str, str]:
  """config.data.rename_fields "abstract:instruction,title:output" -> {"abstract": "instruction",
  "title": "output"}: a record's keys renamed before its format is read (a TSV's columns, a
  corpus' own field names)."""
  out = {}
  for item in (x.strip() for x in spec.split(",")):
    if not item:
      continue
    old, colon, new = (x.strip() for x in item.partition(":"))
    if not colon or not old or not new:
      raise ValueError(f"config.data.rename_fields: {item!r} is not OLD:NEW (e.g. "
                       "'abstract:instruction,title:output').")
    out[old] = new
  return out


def apply_renames(record: Any, renames: dict[str, str]) -> Any:
  if not renames or not isinstance(record, dict):
    return record
  return {renames.get(k, k): v for k, v in record.items()}


def normalize(record: Any, fmt: str, text_field: str, where: str, roles: str = "given") -> dict:
  """One record in the given format -> {"text": ...} or {"messages": [...]}, or RecordError."""
  if fmt == "text":
    return {"text": _text(record, text_field, where)}
  if fmt in ("chat", "sharegpt"):
    return {"messages": _chat(record, where, roles)}
  if fmt == "alpaca":
    return {"messages": _alpaca(record, where)}
  if fmt == "pair":
    return normalize_pair(record, where)
  raise ValueError(f"config.data.format={fmt!r}; use one of {FORMATS}.")


def _require_dict(record: Any, where: str, what: str) -> dict:
  if not isinstance(record, dict):
    raise RecordError(f"{where}: expected a JSON object ({what}), got {type(record).__name__}.")
  return record


def _text(record: Any, text_field: str, where: str) -> str:
  if isinstance(record, str):
    text = record
  else:
    record = _require_dict(record, where, "a text record")
    if text_field not in record:
      raise RecordError(f"{where}: the record has no field {text_field!r} (it has "
                        f"{sorted(record)}); set config.data.text_field to the right name.")
    text = record[text_field]
    if isinstance(text, list):  # chinese-poetry's "paragraphs": one line each
      bad = next((k for k, t in enumerate(text) if not isinstance(t, str)), None)
      if bad is not None:
        raise RecordError(f"{where}: field {text_field!r}[{bad}] is a "
                          f"{type(text[bad]).__name__}; a text field is a string or a list of "
                          "strings.")
      text = "\n".join(text)
    if not isinstance(text, str):
      raise RecordError(f"{where}: field {text_field!r} is a {type(text).__name__}, not a string "
                        "(or a list of strings).")
  if not text.strip():
    raise RecordError(f"{where}: the text is empty.")
  return text


_CONTENT_KEYS = ("content", "value", "message", "text", "utterance")  # KdConv: "message"


def _chat(record: Any, where: str, roles: str = "given") -> list[dict]:
  record = _require_dict(record, where, "a chat record")
  if roles not in ROLE_MODES:
    raise ValueError(f"config.data.roles={roles!r}; use one of {ROLE_MODES}.")
  key = "messages" if "messages" in record else "conversations"
  turns = record.get(key)
  if not isinstance(turns, list):
    raise RecordError(f"{where}: expected a list under 'messages' or 'conversations', got "
                      f"{type(turns).__name__ if key in record else 'neither key'}.")
  if not turns:
    raise RecordError(f"{where}: the conversation under {key!r} is empty.")
  messages = []
  system = record.get("system")
  if isinstance(system, str) and system.strip():
    messages.append({"role": "system", "content": system})
  for k, turn in enumerate(turns):
    if roles == "alternate":
      messages.append(_alternate_turn(turn, k, key, where))
      continue
    if not isinstance(turn, dict):
      raise RecordError(f"{where}: {key}[{k}] is a {type(turn).__name__}, not an object"
                        + ("; for dialogues whose turns are plain strings alternating user and "
                           "assistant, set config.data.roles=alternate." if isinstance(turn, str)
                           else "."))
    raw_role = turn.get("role", turn.get("from"))
    if raw_role is None:
      raise RecordError(f"{where}: {key}[{k}] has no role ('role' or 'from'; keys "
                        f"{sorted(turn)}); for dialogues whose turns alternate user and assistant "
                        "(KdConv, LCCC), set config.data.roles=alternate.")
    content = turn.get("content", turn.get("value"))
    role = ROLES.get(str(raw_role).lower())
    if role is None:
      raise RecordError(f"{where}: {key}[{k}] has unknown role {raw_role!r}; known roles: "
                        f"{sorted(ROLES)}.")
    if not isinstance(content, str):
      raise RecordError(f"{where}: {key}[{k}] ({raw_role}) has no string 'content'/'value'.")
    messages.append({"role": role, "content": reasoning.content_of(turn, content)})
  return messages


def _alternate_turn(turn: Any, k: int, key: str, where: str) -> dict:
  """Turn k of a dialogue without roles: user on even turns, assistant on odd ones."""
  role = "user" if k % 2 == 0 else "assistant"
  if isinstance(turn, str):
    return {"role": role, "content": turn}
  if not isinstance(turn, dict):
    raise RecordError(f"{where}: {key}[{k}] is a {type(turn).__name__}; with "
                      "config.data.roles=alternate a turn is a string or an object with its text "
                      f"under one of {list(_CONTENT_KEYS)}.")
  content = next((turn[c] for c in _CONTENT_KEYS if c in turn), None)
  if not isinstance(content, str):
    raise RecordError(f"{where}: {key}[{k}] has no string text under any of "
                      f"{list(_CONTENT_KEYS)} (keys {sorted(turn)}).")
  raw_role = turn.get("role", turn.get("from"))
  if raw_role is not None and ROLES.get(str(raw_role).lower()) != role:
    raise RecordError(f"{where}: {key}[{k}] says role {raw_role!r}, but config.data.roles="
                      f"alternate makes turn {k} the {role}'s; use roles=given for dialogues "
                      "that name their roles.")
  return {"role": role, "content": reasoning.content_of(turn, content) if role == "assistant"
          else content}


def _alpaca(record: Any, where: str) -> list[dict]:
  record = _require_dict(record, where, "an Alpaca record")
  for field in ("instruction", "output"):
    if not isinstance(record.get(field), str):
      raise RecordError(f"{where}: Alpaca record without a string {field!r} field (keys: "
                        f"{sorted(record)}).")
  messages = []
  if isinstance(record.get("system"), str) and record["system"].strip():
    messages.append({"role": "system", "content": record["system"]})
  for k, pair in enumerate(record.get("history") or []):
    if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
      raise RecordError(f"{where}: history[{k}] is not a [query, answer] pair.")
    messages += [{"role": "user", "content": str(pair[0])},
                 {"role": "assistant", "content": str(pair[1])}]
  query = record["instruction"]
  if isinstance(record.get("input"), str) and record["input"].strip():
    query = f"{query}\n{record['input']}"
  messages += [{"role": "user", "content": query},
               {"role": "assistant", "content": record["output"]}]
  return messages


# Preference pairs (DPO; preference.py tokenizes and packs them).

_PROMPT_KEYS = ("prompt", "conversations", "messages")


def _message(turn, where: str, field: str, default_role: str) -> dict:
  if isinstance(turn, str):
    return {"role": default_role, "content": turn}
  if not isinstance(turn, dict):
    raise RecordError(f"{where}: {field} is a {type(turn).__name__}; expected a string or a "
                      "message object {\"role\", \"content\"}.")
  raw_role = turn.get("role", turn.get("from", default_role))
  role = ROLES.get(str(raw_role).lower())
  if role is None:
    raise RecordError(f"{where}: {field} has unknown role {raw_role!r}; known roles: "
                      f"{sorted(ROLES)}.")
  content = turn.get("content", turn.get("value"))
  if not isinstance(content, str):
    raise RecordError(f"{where}: {field} has no string 'content' (or 'value').")
  return {"role": role, "content": reasoning.content_of(turn, content)}


def _messages(value, where: str, field: str, default_role: str) -> list[dict]:
  """A string, one message object, or a list of messages -> [{role, content}, ...]."""
  if isinstance(value, list):
    return [_message(t, where, f"{field}[{k}]", default_role) for k, t in enumerate(value)]
  return [_message(value, where, field, default_role)]


def _common_prefix(a: list[dict], b: list[dict]) -> int:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


# hh-rlhf (Anthropic): chosen and rejected are whole transcripts
# "\n\nHuman: q\n\nAssistant: a\n\nHuman: q2\n\nAssistant: a2" sharing all but the last answer.
_TRANSCRIPT_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
_TRANSCRIPT_ROLES = {"Human": "user", "Assistant": "assistant"}
TRANSCRIPT_HINT = ("hh-rlhf transcripts look like '\\n\\nHuman: ...\\n\\nAssistant: ...' (each "
                   "turn opens a paragraph with 'Human:' or 'Assistant:')")


def looks_like_transcript(value) -> bool:
  return isinstance(value, str) and bool(re.search(r"(?:^|\n\n)Human:", value)) and (
      "Assistant:" in value)


def parse_transcript(text: str, where: str, field: str) -> list[dict]:
  """An hh-rlhf transcript -> messages, or RecordError saying what does not parse."""
  parts = _TRANSCRIPT_TURN.split(text)
  if parts[0].strip():
    raise RecordError(f"{where}: {field} looks like an hh-rlhf transcript but has text before "
                      f"its first turn ({parts[0].strip()[:40]!r}); {TRANSCRIPT_HINT}.")
  messages = [{"role": _TRANSCRIPT_ROLES[parts[k]], "content": parts[k + 1].strip()}
              for k in range(1, len(parts), 2)]
  for k in range(1, len(messages)):
    if messages[k]["role"] == messages[k - 1]["role"]:
      raise RecordError(f"{where}: {field} looks like an hh-rlhf transcript but turns {k} and "
                        f"{k + 1} are both {messages[k]['role']} turns; {TRANSCRIPT_HINT}.")
  return messages


def normalize_pair(record, where: str) -> dict:
  """A pair record -> {"prompt", "chosen", "rejected"} message lists, or RecordError naming
  `where` (file:line) and the field."""
  if not isinstance(record, dict):
    raise RecordError(f"{where}: a preference pair is a JSON object; got {type(record).__name__}.")
  missing = [f for f in ("chosen", "rejected") if f not in record]
  if missing:
    raise RecordError(
        f"{where}: the preference pair has no {' or '.join(repr(m) for m in missing)} field "
        f"(keys: {sorted(record)}); a pair needs 'chosen' and 'rejected', plus 'prompt', "
        "'conversations' or 'instruction' unless both are whole conversations.")
  key = next((k for k in _PROMPT_KEYS if k in record), None)
  transcripts = key is None and all(looks_like_transcript(record[f])
                                    for f in ("chosen", "rejected"))
  if transcripts:  # hh-rlhf: two whole conversations, prompt = what they share (below)
    chosen = parse_transcript(record["chosen"], where, "chosen")
    rejected = parse_transcript(record["rejected"], where, "rejected")
  else:
    chosen = _messages(record["chosen"], where, "chosen", "assistant")
    rejected = _messages(record["rejected"], where, "rejected", "assistant")
  if key == "prompt" and looks_like_transcript(record["prompt"]):
    # hh-rlhf split into prompt + responses: the prompt ends with an empty "Assistant:" turn
    prompt = parse_transcript(record["prompt"], where, "prompt")
    if prompt and prompt[-1]["role"] == "assistant" and not prompt[-1]["content"]:
      prompt = prompt[:-1]
  elif key is not None:
    prompt = _messages(record[key], where, key, "user")
    # Some datasets repeat the prompt at the start of each response: keep it once.
    n = len(prompt)
    if n and chosen[:n] == prompt and rejected[:n] == prompt:
      chosen, rejected = chosen[n:], rejected[n:]
  elif "instruction" in record:
    query = record["instruction"]
    if not isinstance(query, str):
      raise RecordError(f"{where}: 'instruction' is a {type(query).__name__}, not a string.")
    if isinstance(record.get("input"), str) and record["input"].strip():
      query = f"{query}\n{record['input']}"
    prompt = [{"role": "user", "content": query}]
  else:  # minimind: two whole conversations that share their opening turns
    n = _common_prefix(chosen, rejected)
    prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
  system = record.get("system")
  if isinstance(system, str) and system.strip() and not (prompt and prompt[0]["role"] == "system"):
    prompt = [{"role": "system", "content": system}] + prompt

  if not [m for m in prompt if m["role"] != "system" and m["content"].strip()]:
    hint = ""
    if any(isinstance(record[f], str) and "Human:" in record[f] for f in ("chosen", "rejected")):
      hint = (" chosen/rejected mention 'Human:' but are not both transcripts that share their "
              f"opening turns; {TRANSCRIPT_HINT}.")
    raise RecordError(f"{where}: the pair has no prompt (no user text before the responses); "
                      "give 'prompt' or 'conversations', or make chosen and rejected whole "
                      "conversations that open with the same user turn." + hint)
  if prompt[-1]["role"] == "assistant":
    raise RecordError(f"{where}: the prompt ends with an assistant turn; it must end with the "
                      "user turn that chosen and rejected answer.")
  for side, msgs in (("chosen", chosen), ("rejected", rejected)):
    if not msgs:
      raise RecordError(f"{where}: the {side} response is empty (nothing after the prompt).")
    if msgs[0]["role"] != "assistant":
      raise RecordError(f"{where}: the {side} response starts with a {msgs[0]['role']} turn; "
                        "chosen and rejected must share every turn before the assistant's "
                        "response.")
    if any(not m["content"].strip() for m in msgs if m["role"] == "assistant"):
      raise RecordError(f"{where}: the {side} response is empty (an assistant turn with no "
                        "text); fix the record or set config.data.skip_bad_records=True.")
  if chosen == rejected:
    raise RecordError(f"{where}: chosen and rejected are identical, so the pair states no "
                      "preference; remove it or set config.data.skip_bad_records=True.")
  return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
