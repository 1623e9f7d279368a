"""The embedded RL task: arithmetic word problems with a checkable answer, generated in memory.

  "Wang Ming has 13 apples and gets 7 more. How many apples does Wang Ming have now?"
  -> the solution the SFT set trains: "13 + 7 = 20. Answer: 20"

Problems add or subtract two numbers in 1..MAX_N (a subtraction never goes below zero). The
number pairs (operation, a, b) are split once: a HELDOUT_SHARE of them never appears in the SFT
chats nor in the RL prompts, so held-out accuracy measures arithmetic on unseen pairs, not
recall of seen ones. Names, objects and templates vary between draws; `heldout(seed)` draws
another held-out set over the same held-out pairs, so accuracy can be reported over several
seeds.

  builtin:arith_sft      SFT chats {"messages": [user question, assistant solution]}
  builtin:arith_train    RL prompts {"prompt", "answer"} over the training pairs
  builtin:arith_heldout  RL prompts over the held-out pairs (seed 0)

Everything comes from Python's `random.Random` with fixed seeds: the same records everywhere.
"""

from __future__ import annotations

import functools
import random

from llm_jax.data.builtin import bios

MAX_N = 20
HELDOUT_SHARE = 0.15
SPLIT_SEED = 7
OBJECTS = ["apple", "book", "pencil", "coin", "card", "stamp", "marble", "flower", "shell",
           "sticker", "cookie", "ticket"]
TEMPLATES = {
    "+": ["{name} has {a} {obj}s and gets {b} more. How many {obj}s does {name} have now?",
          "There are {a} {obj}s in a box. {name} puts in {b} more. How many {obj}s are in the box?",
          "{name} found {a} {obj}s on Monday and {b} {obj}s on Tuesday. How many {obj}s in all?"],
    "-": ["{name} has {a} {obj}s and gives away {b}. How many {obj}s does {name} have left?",
          "There are {a} {obj}s in a box. {name} takes out {b}. How many {obj}s are in the box?",
          "{name} had {a} {obj}s and lost {b} of them. How many {obj}s are left?"],
}
SPLITS = ("sft", "train", "heldout")


def solve(op: str, a: int, b: int) -> int:
  return a + b if op == "+" else a - b


def solution(op: str, a: int, b: int) -> str:
  """The worked answer the SFT set trains and the reward parses ("Answer: <n>" at the end)."""
  return f"{a} {op} {b} = {solve(op, a, b)}. Answer: {solve(op, a, b)}"


@functools.lru_cache(maxsize=1)
def pairs() -> tuple[list, list]:
  """(training pairs, held-out pairs), each [(op, a, b)], fixed by SPLIT_SEED."""
  every = [(op, a, b) for op in "+-" for a in range(1, MAX_N + 1) for b in range(1, MAX_N + 1)
           if op == "+" or a >= b]
  rng = random.Random(SPLIT_SEED)
  rng.shuffle(every)
  n_held = int(round(HELDOUT_SHARE * len(every)))
  return sorted(every[n_held:]), sorted(every[:n_held])


def _question(op, a, b, rng: random.Random) -> str:
  surname, given = rng.choice(bios.SURNAMES)[1], rng.choice(bios.GIVEN)[1]
  name = f"{surname} {given.capitalize()}"
  return rng.choice(TEMPLATES[op]).format(name=name, a=a, b=b, obj=rng.choice(OBJECTS))


def prompts(split_pairs, seed: int, copies: int = 1) -> list[dict]:
  """RL prompt records {"prompt", "answer", "expression"}: `copies` draws of every pair."""
  rng = random.Random(seed)
  out = []
  for _ in range(copies):
    for op, a, b in split_pairs:
      out.append({"prompt": _question(op, a, b, rng), "answer": str(solve(op, a, b)),
                  "expression": f"{a} {op} {b}"})
  rng.shuffle(out)
  return out


def heldout(seed: int = 0) -> list[dict]:
  """One draw of prompts over every held-out pair (another seed: other names and wording)."""
  return prompts(pairs()[1], seed=1000 + seed)


@functools.lru_cache(maxsize=2)
def _generate() -> dict:
  train, _ = pairs()
  sft = [{"messages": [{"role": "user", "content": p["prompt"]},
                       {"role": "assistant", "content": solution(*_parse(p["expression"]))}]}
         for p in prompts(train, seed=1, copies=4)]
  return {"sft": sft, "train": prompts(train, seed=2, copies=2), "heldout": heldout(0)}


def _parse(expression: str):
  a, op, b = expression.split()
  return op, int(a), int(b)


def generate(synthetic_cfg=None) -> dict:
  """Every split (the encyclopedia's config does not change this task)."""
  del synthetic_cfg
  return _generate()
