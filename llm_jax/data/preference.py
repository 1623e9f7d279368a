"""Preference pairs for DPO: record shapes -> tokenized pairs -> whole pairs packed into rows.

Record shapes (JSONL lines or the objects of a JSON array; `config.data.mode="dpo"` reads every
record of every source as a pair; formats.normalize_pair reads them):
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

from llm_jax.data import chat_template, packing as packing_lib
from llm_jax.data.sources import Counters, RecordError

PAIR_PACKINGS = ("auto", "best_fit", "first_fit", "none")


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


def cut_pair(sides, seq_len: int):
  """How a pair [(ids, weights) chosen, (ids, weights) rejected] fits a row of seq_len:
  (parts, budgets, kept). A side's example is inputs ids[:-1], targets ids[1:], weights on the
  targets; parts are those cut to the budgets (_budgets), kept is False when a side would keep
  no response token (the pair is dropped)."""
  parts = [(ids[:-1], ids[1:], w[1:]) for ids, w in sides]
  budgets = _budgets(len(parts[0][0]), len(parts[1][0]), seq_len)
  parts = [tuple(a[:b] for a in part) for part, b in zip(parts, budgets)]
  return parts, budgets, all(part[2].any() for part in parts)


class ToPairExamples(grain.experimental.FlatMapTransform):
  """One pair document -> one packable example (chosen then rejected), or none if dropped."""

  max_fan_out = 1

  def __init__(self, data_cfg, tokenizer):
    self._tok = tokenizer
    self._seq_len = data_cfg.seq_len
    self._skip = data_cfg.skip_bad_records
    self.counters = Counters()

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
    parts, budgets, kept = cut_pair(sides, self._seq_len)
    lengths = tuple(len(ids) - 1 for ids, _ in sides)
    if budgets != lengths:
      self.counters.add(f"pairs longer than seq_len={self._seq_len} cut at the end of their "
                        "responses", f"{where}: {lengths[0]} + {lengths[1]} tokens")
      if not kept:
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
