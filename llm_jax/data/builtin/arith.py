"""The embedded RL task: arithmetic word problems with a checkable answer, generated in memory.

  "Wang Ming has 3 apples and gets 7 more. How many apples does Wang Ming have now?"
  -> the solution the SFT set trains: "3 + 7 = 10. Answer: 10"

Problems add or subtract two numbers in 1..MAX_N (a subtraction never goes below zero). The
question templates are split three ways, which is what the demo's GRPO has to learn:
  SFT chats       templates 0-2: "gets ... more" / "gives away", "puts in" / "takes out", ...
                  "found" / "lost"
  RL prompts      templates 3-4: the verbs "adds" / "removes", which SFT shows solved in only
                  one chat in nine, here with an answer to check but no solution (a model fresh
                  from SFT is sometimes right on them, often picking the wrong operation)
  held-out        template 5: "adds" / "removes" in yet another sentence, never trained on,
                  with people's names neither training set uses (the surname list's second half)
So held-out accuracy measures whether what RL taught (which operation the new wording asks for)
carries over to unseen wording. The number pairs are one small set (every a + b and a - b in
1..MAX_N, an arithmetic a tiny model learns in minutes). `heldout(seed)` draws another held-out
set (other names, objects, order), so accuracy is reported over several seeds.

  builtin:arith_sft      SFT chats {"messages": [user question, assistant solution]}: eight
                         draws of every pair in templates 0-2, one in templates 3-4
  builtin:arith_train    RL prompts {"prompt", "answer", "expression"} (templates 3-4)
  builtin:arith_heldout  held-out prompts (seed 0): template 5, unseen names

Everything comes from Python's `random.Random` with fixed seeds: the same records everywhere.
"""

from __future__ import annotations

import functools
import random

from llm_jax.data.builtin import bios

MAX_N = 10
SPLIT_TEMPLATES = {"sft": (0, 1, 2), "train": (3, 4), "heldout": (5,)}  # template indices per split
OBJECTS = ["apple", "book", "pencil", "coin", "card", "stamp", "marble", "flower", "shell",
           "sticker", "cookie", "ticket"]
TEMPLATES = {
    "+": ["{name} has {a} {obj}s and gets {b} more. How many {obj}s does {name} have now?",
          "There are {a} {obj}s in a box. {name} puts in {b} more. How many {obj}s are in the box?",
          "{name} found {a} {obj}s on Monday and {b} {obj}s on Tuesday. How many {obj}s in all?",
          "{name} adds {b} {obj}s to a bag of {a}. How many {obj}s are in the bag?",
          "Starting with {a} {obj}s, {name} adds {b}. How many {obj}s are there now?",
          "A shelf holds {a} {obj}s and {name} adds {b}. How many {obj}s are on the shelf?"],
    "-": ["{name} has {a} {obj}s and gives away {b}. How many {obj}s does {name} have left?",
          "There are {a} {obj}s in a box. {name} takes out {b}. How many {obj}s are in the box?",
          "{name} had {a} {obj}s and lost {b} of them. How many {obj}s are left?",
          "{name} removes {b} {obj}s from a bag of {a}. How many {obj}s are in the bag?",
          "Starting with {a} {obj}s, {name} removes {b}. How many {obj}s are there now?",
          "A shelf holds {a} {obj}s and {name} removes {b}. How many {obj}s stay on the shelf?"],
}
SPLITS = ("sft", "train", "heldout")


def solve(op: str, a: int, b: int) -> int:
  return a + b if op == "+" else a - b


def solution(op: str, a: int, b: int) -> str:
  """The worked answer the SFT set trains and the reward parses ("Answer: <n>" at the end)."""
  return f"{a} {op} {b} = {solve(op, a, b)}. Answer: {solve(op, a, b)}"


def pairs() -> list:
  """Every (op, a, b): a + b and a - b (a >= b) for a, b in 1..MAX_N."""
  return [(op, a, b) for op in "+-" for a in range(1, MAX_N + 1) for b in range(1, MAX_N + 1)
          if op == "+" or a >= b]


def _question(op, a, b, rng: random.Random, split: str) -> str:
  half = len(bios.SURNAMES) // 2
  surnames = bios.SURNAMES[half:] if split == "heldout" else bios.SURNAMES[:half]
  surname, given = rng.choice(surnames)[1], rng.choice(bios.GIVEN)[1]
  name = f"{surname} {given.capitalize()}"
  template = TEMPLATES[op][rng.choice(SPLIT_TEMPLATES[split])]
  return template.format(name=name, a=a, b=b, obj=rng.choice(OBJECTS))


def prompts(seed: int, copies: int = 1, split: str = "train") -> list[dict]:
  """Prompt records {"prompt", "answer", "expression"} in `split`'s wording: `copies` draws of
  every pair."""
  rng = random.Random(seed)
  out = []
  for _ in range(copies):
    for op, a, b in pairs():
      out.append({"prompt": _question(op, a, b, rng, split),
                  "answer": str(solve(op, a, b)), "expression": f"{a} {op} {b}"})
  rng.shuffle(out)
  return out


def heldout(seed: int = 0) -> list[dict]:
  """One held-out draw over every pair (another seed: other names, objects and order)."""
  return prompts(seed=1000 + seed, split="heldout")


@functools.lru_cache(maxsize=2)
def _generate() -> dict:
  sft = [{"messages": [{"role": "user", "content": p["prompt"]},
                       {"role": "assistant", "content": solution(*_parse(p["expression"]))}]}
         for p in prompts(seed=1, copies=8, split="sft") + prompts(seed=3, copies=1)]
  random.Random(4).shuffle(sft)
  return {"sft": sft, "train": prompts(seed=2, copies=4), "heldout": heldout(0)}


def _parse(expression: str):
  a, op, b = expression.split()
  return op, int(a), int(b)


def generate(synthetic_cfg=None) -> dict:
  """Every split (the encyclopedia's config does not change this task)."""
  del synthetic_cfg
  return _generate()
