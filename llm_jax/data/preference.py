"""Preference pairs for DPO: record shapes -> tokenized pairs -> whole pairs packed into rows.

Record shapes (JSONL lines or the objects of a JSON array; `config.data.mode="dpo"` reads every
record of every source as a pair):
  TRL            {"prompt": str | [messages], "chosen": str | [messages], "rejected": ...}
  minimind       {"chosen": [messages], "rejected": [messages]}: two whole conversations; the
                 prompt is their common leading messages, each response what follows
  LLaMA-Factory  {"conversations": [{"from", "value"}], "chosen": {"from", "value"},
                 "rejected": {...}, "system"?} ("messages" for "conversations" works too)
  Alpaca pair    {"instruction", "input"?, "chosen": str, "rejected": str, "system"?}
Messages are {"role", "content"} or {"from", "value"}; a response given as a string or a single
object is one assistant turn; an assistant's `reasoning_content` is joined in (reasoning.py).

Tokens. Each side is rendered as prompt + response by the SFT ChatML template
(chat_template.encode_chat), so the log-probabilities DPO compares are those SFT trained. The
weights are 1 exactly on the response's assistant tokens and their <|im_end|>, 0 on the prompt,
including assistant turns inside a multi-turn prompt.

Packing. A pair is ONE example for the packer: the chosen sequence, then the rejected one, with
positions restarting at the rejected one and a `sides` feature (1 chosen, 2 rejected). Packers
place whole examples, so a pair never straddles rows. After packing, pair k of a row (k = 1, 2,
...) has segment id 2k-1 on its chosen tokens and 2k on its rejected tokens (0 = padding): the
batch is the usual five keys, the model's block-diagonal mask keeps the two sides apart, and the
DPO objective (train/dpo.py) reads the pairing from the segment ids. Because rows are never
split, any sharding of rows over devices or microbatches keeps every pair whole. A pair must fit
in one row: `config.data.seq_len` bounds chosen + rejected together; longer pairs are cut at the
end of their responses (counted in the log) and dropped only if a side would keep no response
token.
"""

from __future__ import annotations

import grain
import numpy as np

from llm_jax.data import chat_template, formats, packing as packing_lib, reasoning
from llm_jax.data.sources import RecordError

PAIR_PACKINGS = ("auto", "best_fit", "first_fit", "none")
_PROMPT_KEYS = ("prompt", "conversations", "messages")


def _message(turn, where: str, field: str, default_role: str) -> dict:
  if isinstance(turn, str):
    return {"role": default_role, "content": turn}
  if not isinstance(turn, dict):
    raise RecordError(f"{where}: {field} is a {type(turn).__name__}; expected a string or a "
                      "message object {\"role\", \"content\"}.")
  raw_role = turn.get("role", turn.get("from", default_role))
  role = formats.ROLES.get(str(raw_role).lower())
  if role is None:
    raise RecordError(f"{where}: {field} has unknown role {raw_role!r}; known roles: "
                      f"{sorted(formats.ROLES)}.")
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
  chosen = _messages(record["chosen"], where, "chosen", "assistant")
  rejected = _messages(record["rejected"], where, "rejected", "assistant")
  key = next((k for k in _PROMPT_KEYS if k in record), None)
  if key is not None:
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
    raise RecordError(f"{where}: the pair has no prompt (no user text before the responses); "
                      "give 'prompt' or 'conversations', or make chosen and rejected whole "
                      "conversations that open with the same user turn.")
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


def encode_side(tok, prompt: list[dict], response: list[dict], where: str
                ) -> tuple[np.ndarray, np.ndarray]:
  """(ids, weights) of prompt + response; weights only on the response's assistant tokens."""
  ids, weights = chat_template.encode_chat(tok, prompt + response, where=where)
  # The prompt with the generation header "<|im_start|>assistant\n" is exactly the rendering up
  # to the first response token (the template encodes each piece on its own).
  prompt_ids, _ = chat_template.encode_chat(tok, prompt, add_generation_prompt=True, where=where)
  n = len(prompt_ids)
  if not np.array_equal(ids[:n], prompt_ids):
    raise AssertionError(f"{where}: the chat template rendered the prompt differently inside the "
                         "conversation; chat_template.encode_chat must encode pieces separately.")
  weights[:n] = 0.0
  return ids, weights


def _budgets(n_chosen: int, n_rejected: int, seq_len: int) -> tuple[int, int]:
  """Lengths that fit both sides in one row: the shorter side whole if it takes at most half
  the row, the longer one cut to the rest; else half the row each."""
  if n_chosen + n_rejected <= seq_len:
    return n_chosen, n_rejected
  if min(n_chosen, n_rejected) <= seq_len // 2:
    if n_chosen <= n_rejected:
      return n_chosen, seq_len - n_chosen
    return seq_len - n_rejected, n_rejected
  return seq_len - seq_len // 2, seq_len // 2


class ToPairExamples(grain.experimental.FlatMapTransform):
  """One pair document -> one packable example (chosen then rejected), or none if dropped."""

  max_fan_out = 1

  def __init__(self, data_cfg, tokenizer):
    from llm_jax.data import pipeline  # pylint: disable=g-import-not-at-top (pipeline imports us)
    self._tok = tokenizer
    self._seq_len = data_cfg.seq_len
    self._skip = data_cfg.skip_bad_records
    self.counters = pipeline._Counters()  # pylint: disable=protected-access

  def flat_map(self, doc: dict) -> list[dict]:
    if "error" in doc:
      self.counters.add("skipped bad records (skip_bad_records=True)", doc["error"])
      return []
    where = doc.get("where", "pair")
    try:
      if "chosen" not in doc:
        raise RecordError(f"{where}: not a preference pair (keys {sorted(doc)}); DPO reads "
                          "records with 'chosen' and 'rejected'.")
      sides = [encode_side(self._tok, doc["prompt"], doc[s], where) for s in ("chosen", "rejected")]
    except RecordError as e:
      if not self._skip:
        raise
      self.counters.add("skipped bad records (skip_bad_records=True)", str(e))
      return []
    # Example of a side: inputs ids[:-1], targets ids[1:], weights on the targets.
    parts = [(ids[:-1], ids[1:], w[1:]) for ids, w in sides]
    budgets = _budgets(len(parts[0][0]), len(parts[1][0]), self._seq_len)
    if budgets != (len(parts[0][0]), len(parts[1][0])):
      self.counters.add(f"pairs longer than seq_len={self._seq_len} cut at the end of their "
                        "responses", f"{where}: {len(parts[0][0])} + {len(parts[1][0])} tokens")
      parts = [tuple(a[:b] for a in part) for part, b in zip(parts, budgets)]
      if not all(part[2].any() for part in parts):
        self.counters.add("pairs whose prompt fills the row, dropped (raise config.data.seq_len)",
                          f"{where}: budgets {budgets}")
        return []
    return [{
        "inputs": np.concatenate([p[0] for p in parts]).astype(np.int32),
        "targets": np.concatenate([p[1] for p in parts]).astype(np.int32),
        "loss_weights": np.concatenate([p[2] for p in parts]).astype(np.float32),
        "positions": np.concatenate([np.arange(len(p[0]), dtype=np.int32) for p in parts]),
        "sides": np.concatenate([np.full(len(p[0]), s, np.int32) for s, p in ((1, parts[0]),
                                                                              (2, parts[1]))]),
    }]


def pairs_and_pack(ds: grain.MapDataset, data_cfg, tokenizer, *, seed: int, num_bins: int,
                   shuffle_bins: bool) -> grain.IterDataset:
  """Pair documents -> packed rows of the five-key contract (pairing in the segment ids)."""
  if data_cfg.packing not in PAIR_PACKINGS:
    raise ValueError(f"config.data.packing={data_cfg.packing!r}: DPO packs whole pairs into "
                     f"rows; use one of {PAIR_PACKINGS}.")
  it = grain.experimental.FlatMapIterDataset(ds.to_iter_dataset(),
                                             ToPairExamples(data_cfg, tokenizer))
  return packing_lib.pack_pairs(it, data_cfg.packing, data_cfg.seq_len, num_bins=num_bins,
                                seed=seed, shuffle_bins=shuffle_bins)


def pair_layout(segment_ids_L: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
  """(chosen positions, rejected positions) of each pair in a packed row, in order (tests and
  debugging read rows back with it)."""
  n_pairs = int(segment_ids_L.max()) // 2
  return [(np.flatnonzero(segment_ids_L == 2 * k - 1), np.flatnonzero(segment_ids_L == 2 * k))
          for k in range(1, n_pairs + 1)]
