"""Packing variable-length examples into fixed blocks: the one file that talks to Grain's
(fast-moving) grain.experimental packers.

Examples are dicts of equal-length 1-D arrays `inputs`, `targets`, `loss_weights`. Grain's
packers emit, per packed feature, `<feature>_segment_ids` (0 = padding, 1.. per example in the
row) and `<feature>_positions` (restarting at 0 per example), padding values with 0. All three
features share the same lengths, so their segment ids and positions are identical; we keep the
ones of `inputs` and drop the rest, yielding the five-key batch contract.
"""

from __future__ import annotations

import grain
import numpy as np

FEATURES = ("inputs", "targets", "loss_weights")
PACKINGS = ("first_fit", "best_fit", "concat_then_split", "none")


def resolve_packing(packing: str, mode: str) -> str:
  if packing == "auto":
    # Pretraining: concat-then-split wastes no tokens on padding and splits long documents.
    # SFT: best-fit keeps each conversation whole in one row with little padding.
    return "concat_then_split" if mode == "pretrain" else "best_fit"
  if packing not in PACKINGS:
    raise ValueError(f"config.data.packing={packing!r}; use auto or one of {PACKINGS}.")
  if packing == "concat_then_split" and mode == "sft":
    raise ValueError("config.data.packing=concat_then_split would split conversations across "
                     "rows in SFT; use best_fit or first_fit (or mode=pretrain).")
  return packing


def pack(ds: grain.IterDataset, packing: str, seq_len: int, *, num_bins: int,
         seed: int, shuffle_bins: bool) -> grain.IterDataset:
  """Packs examples (each at most seq_len long) into rows of exactly seq_len tokens."""
  lengths = {f: seq_len for f in FEATURES}
  if packing == "concat_then_split":
    ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=lengths)
  elif packing in ("first_fit", "best_fit"):
    packer = (grain.experimental.FirstFitPackIterDataset if packing == "first_fit"
              else grain.experimental.BestFitPackIterDataset)
    ds = packer(ds, length_struct=lengths, num_packing_bins=num_bins, seed=seed,
                shuffle_bins=shuffle_bins)
  elif packing == "none":
    return ds.map(_PadOne(seq_len))
  else:
    raise ValueError(f"unknown packing {packing!r}; use one of {PACKINGS}.")
  return ds.map(_to_contract)


def _to_contract(row: dict) -> dict:
  return {
      "inputs": row["inputs"].astype(np.int32),
      "targets": row["targets"].astype(np.int32),
      "loss_weights": row["loss_weights"].astype(np.float32),
      "segment_ids": row["inputs_segment_ids"].astype(np.int32),
      "positions": row["inputs_positions"].astype(np.int32),
  }


class _PadOne(grain.transforms.Map):
  """No packing: one example per row, right-padded."""

  def __init__(self, seq_len: int):
    self._seq_len = seq_len

  def map(self, example: dict) -> dict:
    n, pad = len(example["inputs"]), self._seq_len - len(example["inputs"])
    row = {k: np.pad(example[k], (0, pad)) for k in FEATURES}
    row["inputs_segment_ids"] = np.pad(np.ones(n, np.int32), (0, pad))
    row["inputs_positions"] = np.pad(np.arange(n, dtype=np.int32), (0, pad))
    return _to_contract(row)


def stack_rows(rows) -> dict:
  """Batches rows (dicts of [seq_len] arrays) into dicts of [n, seq_len] arrays."""
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def pad_rows(batch: dict, rows: int) -> dict:
  """Appends all-zero rows (segment_ids 0: padding, loss_weights 0) up to `rows`."""
  n = len(batch["inputs"])
  if n == rows:
    return batch
  return {k: np.concatenate([v, np.zeros((rows - n,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}


# DPO pairs (preference.py): a pair is one example of these features, packed whole.
PAIR_FEATURES = FEATURES + ("positions", "sides")


def pack_pairs(ds: grain.IterDataset, packing: str, seq_len: int, *, num_bins: int, seed: int,
               shuffle_bins: bool) -> grain.IterDataset:
  """Packs pair examples (chosen then rejected, `sides` 1/2) whole into rows of seq_len tokens;
  pair k of a row gets segment ids 2k-1 (chosen) and 2k (rejected)."""
  lengths = {f: seq_len for f in PAIR_FEATURES}
  if packing in ("auto", "best_fit", "first_fit"):
    packer = (grain.experimental.FirstFitPackIterDataset if packing == "first_fit"
              else grain.experimental.BestFitPackIterDataset)
    ds = packer(ds, length_struct=lengths, num_packing_bins=num_bins, seed=seed,
                shuffle_bins=shuffle_bins)
  elif packing == "none":
    ds = ds.map(_PadPair(seq_len))
  else:
    raise ValueError(f"config.data.packing={packing!r}: pairs are packed whole; use auto, "
                     "best_fit, first_fit or none.")
  return ds.map(_pair_contract)


def _pair_contract(row: dict) -> dict:
  sides = row["sides"].astype(np.int32)
  pair = row["inputs_segment_ids"].astype(np.int32)  # 1.. per packed pair, 0 = padding
  return {
      "inputs": row["inputs"].astype(np.int32),
      "targets": row["targets"].astype(np.int32),
      "loss_weights": row["loss_weights"].astype(np.float32),
      "segment_ids": np.where(sides > 0, 2 * pair - 2 + sides, 0).astype(np.int32),
      "positions": row["positions"].astype(np.int32),  # restart at the rejected side
  }


class _PadPair(grain.transforms.Map):
  """No packing: one pair per row, right-padded."""

  def __init__(self, seq_len: int):
    self._seq_len = seq_len

  def map(self, example: dict) -> dict:
    n, pad = len(example["inputs"]), self._seq_len - len(example["inputs"])
    row = {k: np.pad(example[k], (0, pad)) for k in PAIR_FEATURES}
    row["inputs_segment_ids"] = np.pad(np.ones(n, np.int32), (0, pad))
    return row
