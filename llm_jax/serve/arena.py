"""The blind two-model arena: battles, votes in SQLite, and a Bradley-Terry leaderboard.

A battle pairs two served models at random in random order (sides "a" and "b"); the page only
ever sees the sides until a vote is cast, then the names. A vote counts only for a battle whose
two answers were both given in full (`shown`): nobody votes on answers they never saw. Votes follow FastChat's arena: a is
better, b is better, tie, both bad. The leaderboard fits a Bradley-Terry model to all votes (ties and
"both bad" count half a win each way) and reports it on the Elo scale, 1000 + 400 log10(strength).
One virtual tie between every pair of models keeps the fit finite with few votes (a model that won
its only battle does not get an infinite rating) and connects models that never met.
"""

from __future__ import annotations

import collections
import math
import os
import random
import secrets
import sqlite3
import threading
import time

import numpy as np

WINNERS = ("a", "b", "tie", "both_bad")


class NotShown(Exception):
  """A vote for a battle whose two answers have not both been given."""
_MAX_BATTLES = 10_000  # open battles kept in memory (oldest forgotten first)


class Arena:

  def __init__(self, db_path: str, models: list[str], seed: int | None = None):
    self.models = list(models)
    self.db_path = db_path
    directory = os.path.dirname(os.path.abspath(db_path))
    os.makedirs(directory, exist_ok=True)
    self._db = sqlite3.connect(db_path, check_same_thread=False)
    self._db.execute("""CREATE TABLE IF NOT EXISTS votes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        created REAL NOT NULL,
        battle_id TEXT UNIQUE NOT NULL,
        model_a TEXT NOT NULL,
        model_b TEXT NOT NULL,
        winner TEXT NOT NULL CHECK (winner IN ('a', 'b', 'tie', 'both_bad')),
        prompt TEXT)""")
    self._db.commit()
    self._lock = threading.Lock()
    # battle id -> (model_a, model_b, the sides whose answer was given in full)
    self._battles: collections.OrderedDict[str, tuple[str, str, set]] = collections.OrderedDict()
    self._rng = random.Random(seed)

  def close(self) -> None:
    with self._lock:
      self._db.close()

  def new_battle(self) -> str:
    if len(self.models) < 2:
      raise ValueError("the arena needs at least two models: start the server with two --workdir flags")
    a, b = self._rng.sample(self.models, 2)
    battle_id = "battle-" + secrets.token_hex(8)
    with self._lock:
      self._battles[battle_id] = (a, b, set())
      while len(self._battles) > _MAX_BATTLES:
        self._battles.popitem(last=False)
    return battle_id

  def model_of(self, battle_id: str, side: str) -> str | None:
    pair = self._battles.get(battle_id)
    return None if pair is None else pair[0 if side == "a" else 1]

  def shown(self, battle_id: str, side: str) -> None:
    """Side `side` of the battle has given its whole answer."""
    with self._lock:
      battle = self._battles.get(battle_id)
      if battle is not None:
        battle[2].add(side)

  def vote(self, battle_id: str, winner: str, prompt: str = "") -> tuple[str, str]:
    """Stores the vote; returns (model_a, model_b). KeyError: unknown battle; NotShown: its answers
    were not both given; ValueError: voted."""
    with self._lock:
      battle = self._battles.get(battle_id)
      if battle is None:
        raise KeyError(battle_id)
      pair = battle[:2]
      if battle[2] != {"a", "b"}:
        raise NotShown(battle_id)
      try:
        self._db.execute("INSERT INTO votes (created, battle_id, model_a, model_b, winner, prompt) "
                         "VALUES (?, ?, ?, ?, ?, ?)", (time.time(), battle_id, pair[0], pair[1], winner, prompt))
        self._db.commit()
      except sqlite3.IntegrityError:
        raise ValueError(f"battle {battle_id} already has a vote") from None
    return pair

  def votes(self) -> list[tuple[str, str, str]]:
    with self._lock:
      return list(self._db.execute("SELECT model_a, model_b, winner FROM votes ORDER BY id"))

  def leaderboard(self) -> list[dict]:
    votes = self.votes()
    names = sorted(set(self.models) | {m for a, b, _ in votes for m in (a, b)})
    ratings = bradley_terry(names, votes)
    rows = {m: {"model": m, "rating": ratings[m], "battles": 0, "wins": 0, "losses": 0, "ties": 0,
                "both_bad": 0} for m in names}
    for a, b, w in votes:
      for m in (a, b):
        rows[m]["battles"] += 1
      if w == "a":
        rows[a]["wins"] += 1
        rows[b]["losses"] += 1
      elif w == "b":
        rows[b]["wins"] += 1
        rows[a]["losses"] += 1
      else:
        for m in (a, b):
          rows[m]["ties" if w == "tie" else "both_bad"] += 1
    return sorted(rows.values(), key=lambda r: (-r["rating"], r["model"]))


def bradley_terry(names: list[str], votes: list[tuple[str, str, str]], iters: int = 500) -> dict[str, float]:
  """Elo-scale Bradley-Terry ratings (Hunter's MM algorithm), one virtual tie per pair as prior."""
  n = len(names)
  if n <= 1:
    return {m: 1000.0 for m in names}
  idx = {m: i for i, m in enumerate(names)}
  wins = np.full((n, n), 0.5) - 0.5 * np.eye(n)  # wins[i, j]: i over j; the virtual ties
  for a, b, w in votes:
    i, j = idx[a], idx[b]
    if w == "a":
      wins[i, j] += 1
    elif w == "b":
      wins[j, i] += 1
    else:
      wins[i, j] += 0.5
      wins[j, i] += 0.5
  games = wins + wins.T
  p = np.ones(n)
  for _ in range(iters):
    denom = (games / (p[:, None] + p[None, :])).sum(axis=1)
    new = wins.sum(axis=1) / np.maximum(denom, 1e-300)
    new /= math.exp(np.mean(np.log(new)))  # geometric mean 1: the average model rates 1000
    if np.max(np.abs(new - p)) < 1e-12:
      p = new
      break
    p = new
  return {m: 1000.0 + 400.0 * math.log10(p[idx[m]]) for m in names}
