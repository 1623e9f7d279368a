"""Repetition metrics of Welleck et al. (2019, "Neural text degeneration with unlikelihood
training") plus distinct-n and loop detection. Pure functions over token id sequences.

  seq-rep-n   per continuation: 1 - |unique n-grams| / |n-grams|, averaged over continuations
              (a continuation shorter than n has no n-grams and is left out of the mean; with
              none left the figure is undefined, null in the JSON, and left out of tables)
  rep/l       teacher-forced on ground-truth text: the share of positions t whose next-token
              argmax prediction occurs among the previous l ground-truth tokens x[t-l+1..t]
  wrep/l      the same, counting only wrong predictions (argmax != x[t+1])
  distinct-n  |unique n-grams| / |n-grams| over all continuations together (Li et al. 2016)
  loop        a continuation that hit the length limit and whose last `window` tokens repeat one
              pattern of period p <= window / 2 (so at least two full cycles)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _ngrams(tokens: Sequence[int], n: int) -> list[tuple]:
  return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def seq_rep_n(tokens: Sequence[int], n: int = 4) -> float | None:
  """1 - unique/total n-grams of one sequence; None when it has no n-grams."""
  grams = _ngrams(list(tokens), n)
  if not grams:
    return None
  return 1.0 - len(set(grams)) / len(grams)


def mean_seq_rep_n(sequences: Sequence[Sequence[int]], n: int = 4) -> float | None:
  """The mean over sequences that have n-grams; None (undefined, not 0) when none has: a model
  that answers with a token or two neither repeats nor avoids repeating."""
  values = [v for v in (seq_rep_n(s, n) for s in sequences) if v is not None]
  return float(np.mean(values)) if values else None


def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float:
  grams = [g for s in sequences for g in _ngrams(list(s), n)]
  return len(set(grams)) / len(grams) if grams else 0.0


def ends_in_loop(tokens: Sequence[int], window: int = 32) -> bool:
  """Whether the last `window` tokens are periodic with some period p <= window // 2."""
  tail = list(tokens[-window:])
  if len(tail) < window or window < 2:
    return False
  return any(all(tail[i] == tail[i + p] for i in range(window - p))
             for p in range(1, window // 2 + 1))


def rep_l(predictions: np.ndarray, inputs: np.ndarray, targets: np.ndarray, weights: np.ndarray,
          windows: Sequence[int]) -> dict:
  """rep/l and wrep/l counts over teacher-forced rows, one document per row from position 0.

  predictions[B, L]: argmax next-token ids at each input position t (guesses of x[t+1]);
  inputs[B, L]: the ground truth x[t]; targets[B, L]: x[t+1]; weights[B, L]: positions to count
  (> 0 on real tokens, or on assistant tokens only). The window of position t is the previous l
  ground-truth tokens x[t-l+1 .. t] (fewer near the start). Returns counts, so batches add up:
  {"positions", "rep/l", "wrep/l"}."""
  predictions, inputs, targets = map(np.asarray, (predictions, inputs, targets))
  counted = np.asarray(weights) > 0
  out = {"positions": int(counted.sum())}
  length = inputs.shape[1]
  for window in windows:
    hit = np.zeros(inputs.shape, bool)
    for j in range(min(window, length)):  # x[t - j], j = 0 .. l-1
      hit[:, j:] |= predictions[:, j:] == inputs[:, :length - j]
    hit &= counted
    out[f"rep/{window}"] = int(hit.sum())
    out[f"wrep/{window}"] = int((hit & (predictions != targets)).sum())
  return out


def finish_rep_l(counts: dict, windows: Sequence[int]) -> dict:
  n = max(counts.get("positions", 0), 1)
  out = {}
  for window in windows:
    out[f"rep_{window}"] = counts.get(f"rep/{window}", 0) / n
    out[f"wrep_{window}"] = counts.get(f"wrep/{window}", 0) / n
  out["rep_positions"] = counts.get("positions", 0)
  return out


def continuation_metrics(sequences: Sequence[Sequence[int]], finished: Sequence[bool], *,
                         n: int = 4, loop_window: int = 32) -> dict:
  """seq-rep-n, distinct-1/2, loop share and mean length of generated continuations.
  `finished[i]`: the continuation stopped on its own (end token), so it is not a loop."""
  loops = [not f and ends_in_loop(s, loop_window) for s, f in zip(sequences, finished)]
  return {f"seq_rep_{n}": mean_seq_rep_n(sequences, n),
          f"seq_rep_{n}_count": sum(len(s) >= n for s in sequences),
          "distinct_1": distinct_n(sequences, 1), "distinct_2": distinct_n(sequences, 2),
          "loop_share": float(np.mean(loops)) if loops else 0.0,
          "mean_length": float(np.mean([len(s) for s in sequences])) if sequences else 0.0,
          "count": len(sequences)}
