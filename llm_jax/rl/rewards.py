"""Reward functions of online RL: plain Python over text, chosen in the config by name.

Every reward function has TRL's signature
    fn(prompts: list[str], completions: list[str], **fields) -> list[float]
where `fields` holds one list per record field of the prompt set (e.g. answer=[...]), repeated
for each completion of a prompt, plus completion_tokens (ints) and finish_reasons ("stop",
"length"). `config.grpo.rewards` is a comma-separated list of built-in names or
`module:function` of your own (imported from PYTHONPATH); `config.grpo.reward_weights` weighs
them (default 1 each). Each is logged as rewards/<name>/mean; the total is their weighted sum.

Built-ins:
  exact_answer   1 if the final answer equals the record's `answer` field (after trimming,
                 case-insensitive), else 0. The final answer is what follows the last
                 "Answer:" or sits in the last <answer>...</answer>; without either, the
                 completion's last line.
  number         1 if the last number in the final answer is within `number_tolerance`
                 (absolute) of the number in `answer`, else 0.
  format         1 if the completion matches config.grpo.format_pattern (a Python regex,
                 re.fullmatch over the stripped completion), else 0.
  think_format   1 if the completion is "<think>...</think>" followed by a non-empty answer.
  length_penalty DAPO's soft overlong penalty on completion tokens n, with L = max_new_tokens
                 and C = overlong_buffer: 0 while n <= L - C, then linearly down to -1 at n = L.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from typing import Callable, Sequence

RewardFn = Callable[..., list]
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_answer(completion: str) -> str:
  """The completion's final answer (see the module docstring)."""
  tags = re.findall(r"<answer>(.*?)</answer>", completion, flags=re.S)
  if tags:
    return tags[-1].strip()
  at = completion.rfind("Answer:")
  if at >= 0:
    return completion[at + len("Answer:"):].strip()
  lines = [l for l in completion.strip().splitlines() if l.strip()]
  return lines[-1].strip() if lines else ""


def _answers(fields: dict, n: int, name: str) -> list:
  if "answer" not in fields:
    raise ValueError(f"reward {name!r} compares with each prompt record's 'answer' field, and "
                     f"the prompt set has none (fields: {sorted(fields)})")
  return fields["answer"]


def exact_answer(prompts, completions, **fields) -> list[float]:
  answers = _answers(fields, len(completions), "exact_answer")
  return [float(final_answer(c).strip().lower() == str(a).strip().lower())
          for c, a in zip(completions, answers)]


def make_number(tolerance: float) -> RewardFn:
  def number(prompts, completions, **fields) -> list[float]:
    out = []
    for c, a in zip(completions, _answers(fields, len(completions), "number")):
      got, want = _NUMBER.findall(final_answer(c)), _NUMBER.findall(str(a))
      out.append(float(bool(got and want) and abs(float(got[-1]) - float(want[-1])) <= tolerance))
    return out
  return number


def make_format(pattern: str) -> RewardFn:
  try:
    compiled = re.compile(pattern, flags=re.S)
  except re.error as e:
    raise ValueError(f"config.grpo.format_pattern={pattern!r} is not a valid regex ({e})") from None

  def format(prompts, completions, **fields) -> list[float]:  # pylint: disable=redefined-builtin
    return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]
  return format


def think_format(prompts, completions, **fields) -> list[float]:
  pat = re.compile(r"<think>.+?</think>\s*\S.*", flags=re.S)
  return [float(pat.fullmatch(c.strip()) is not None) for c in completions]


def make_length_penalty(max_new_tokens: int, buffer: int) -> RewardFn:
  def length_penalty(prompts, completions, *, completion_tokens, **fields) -> list[float]:
    start = max_new_tokens - buffer
    return [0.0 if n <= start else -min(1.0, (n - start) / max(buffer, 1))
            for n in completion_tokens]
  return length_penalty


BUILTIN = ("exact_answer", "number", "format", "think_format", "length_penalty")


@dataclasses.dataclass
class Rewards:
  names: list[str]
  fns: list[RewardFn]
  weights: list[float]

  def __call__(self, prompts: Sequence[str], completions: Sequence[str], fields: dict
               ) -> tuple[list[float], dict[str, list[float]]]:
    """(total reward per completion, {name: that reward per completion})."""
    per = {}
    for name, fn in zip(self.names, self.fns):
      vals = fn(list(prompts), list(completions), **fields)
      vals = [float(v) for v in vals]
      if len(vals) != len(completions):
        raise ValueError(f"reward {name!r} returned {len(vals)} values for {len(completions)} "
                         "completions; return one float per completion")
      if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"reward {name!r} returned a non-finite value: {vals}")
      per[name] = vals
    total = [sum(w * per[n][i] for n, w in zip(self.names, self.weights))
             for i in range(len(completions))]
    return total, per


def _user_fn(spec: str) -> RewardFn:
  module, _, attr = spec.partition(":")
  try:
    fn = getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"config.grpo.rewards: cannot load {spec!r} ({e}); give module:function "
                     "with the module on PYTHONPATH") from None
  if not callable(fn):
    raise ValueError(f"config.grpo.rewards: {spec!r} is not callable")
  return fn


def from_config(g, names: str | None = None) -> Rewards:
  """The rewards of config.grpo (`rewards`, `reward_weights`, and the built-ins' settings);
  `names` instead of g.rewards: those, each with weight 1 (e.g. the eval reward)."""
  own_weights = names is None
  spec = g.rewards if names is None else names
  names = [n.strip() for n in spec.split(",") if n.strip()]
  if not names:
    raise ValueError("config.grpo.rewards is empty; name at least one, e.g. exact_answer")
  weights = ([float(w) for w in str(g.reward_weights).split(",") if w.strip()]
             if g.reward_weights and own_weights else [1.0] * len(names))
  if len(weights) != len(names):
    raise ValueError(f"config.grpo.reward_weights={g.reward_weights!r}: {len(weights)} weights for "
                     f"{len(names)} rewards ({names})")
  fns = []
  for n in names:
    if ":" in n:
      fns.append(_user_fn(n))
    elif n == "exact_answer":
      fns.append(exact_answer)
    elif n == "number":
      fns.append(make_number(g.number_tolerance))
    elif n == "format":
      fns.append(make_format(g.format_pattern))
    elif n == "think_format":
      fns.append(think_format)
    elif n == "length_penalty":
      fns.append(make_length_penalty(g.max_new_tokens, g.overlong_buffer))
    else:
      raise ValueError(f"config.grpo.rewards: unknown reward {n!r}; built-ins are {BUILTIN}, "
                       "or give module:function")
  return Rewards(names, fns, weights)
