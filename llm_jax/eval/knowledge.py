"""Knowledge probes: does the model answer questions about facts, and about which people?

On the embedded encyclopedia every person is asked about every attribute (greedy answers), and
each probe is tagged with the person's groups:
  qa   "trained" (their QA chats are in builtin:bios_qa_train) | "heldout" (in bios_qa_heldout)
  bio  "seen" (their biographies are in builtin:bios) | "unseen" (left out, unseen_fraction)
A model that answers held-out people's questions read the facts in biographies and learned the
question format in SFT; held-out and unseen people show the floor (format without facts).

Two scores per answer, after normalising both sides (NFKC, case-folded, spaces collapsed,
trailing punctuation dropped):
  exact     the answer equals the reference (the canonical answer sentence SFT taught, or the
            answer of a user's probe)
  contains  the expected value (e.g. "Hangzhou", "1987年3月5日") occurs in the answer
A user's probe file (config.eval.probe) is JSONL: {"question": str, "answer": str} (or
"prompt" / "messages" instead of "question"; "aliases": [str] are also accepted for contains).
"""

from __future__ import annotations

import dataclasses
import os
import unicodedata
from typing import Sequence

from llm_jax.data.builtin import bios
from llm_jax.data.sources import read_records

_TRAILING = " \t\n.。!！?？,，;；:：'\"“”‘’"


@dataclasses.dataclass
class Probe:
  messages: list[dict]  # the prompt as chat messages (a user question)
  reference: str  # the full expected answer (exact match)
  values: list[str]  # any of these inside the answer counts for "contains"
  tags: dict  # e.g. {"qa": "heldout", "bio": "seen", "attribute": "major", "lang": "en"}


def normalize(text: str) -> str:
  text = unicodedata.normalize("NFKC", text).casefold()
  return " ".join(text.split()).strip(_TRAILING)


def judge(answer: str, probe: Probe) -> tuple[bool, bool]:
  """(exact, contains) for one answer."""
  a = normalize(answer)
  exact = a == normalize(probe.reference)
  contains = any(v and normalize(v) in a for v in probe.values)
  return exact, contains


def encyclopedia_probes(synthetic_cfg, max_people: int = 0) -> list[Probe]:
  """One probe per person, attribute and language of the encyclopedia. `max_people` > 0 keeps at
  most that many people of each (qa, bio) group, the first by index, so every group is covered."""
  data = bios.generate(synthetic_cfg)
  heldout, unseen = set(data["heldout"]), set(data["unseen"])
  langs = [s.strip() for s in synthetic_cfg.languages.split(",") if s.strip()]
  n_templates = min(int(synthetic_cfg.templates_per_attribute),
                    len(bios.QUESTIONS["en"]["major"]))
  taken: dict[tuple, int] = {}
  probes = []
  for k, person in enumerate(data["people"]):
    group = ("heldout" if k in heldout else "trained", "unseen" if k in unseen else "seen")
    if max_people and taken.get(group, 0) >= max_people:
      continue
    taken[group] = taken.get(group, 0) + 1
    for lang in langs:
      for a, attribute in enumerate(bios.ATTRIBUTES):
        # Rotate through the question templates SFT trained on, so all phrasings are asked.
        question = bios.QUESTIONS[lang][attribute][(k + a) % n_templates]
        name = person["name"][lang]
        reference = bios.BIO_TEMPLATES[lang][attribute][0].format(
            name=name, v=person[attribute][lang])
        probes.append(Probe(
            messages=[{"role": "user", "content": question.format(name=name)}],
            reference=reference, values=[person[attribute][lang]],
            tags={"qa": group[0], "bio": group[1], "attribute": attribute, "lang": lang}))
  return probes


def read_probe_file(path: str) -> list[Probe]:
  probes = []
  if not os.path.isfile(path):
    raise ValueError(f"config.eval.probe={path!r}: cannot open it (no such file)")
  hint = 'write one object per line like {"question": "...", "answer": "..."}'
  for where, rec in read_records(path, hint):
    if isinstance(rec.get("messages"), list):
      messages = rec["messages"]
    else:
      question = rec.get("question", rec.get("prompt"))
      if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: field 'question' (or 'prompt' / 'messages') is missing or "
                         "empty")
      messages = [{"role": "user", "content": question}]
    answer = rec.get("answer")
    if not isinstance(answer, str) or not answer.strip():
      raise ValueError(f"{where}: field 'answer' is missing or empty")
    aliases = rec.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(x, str) for x in aliases):
      raise ValueError(f"{where}: field 'aliases' must be a list of strings")
    probes.append(Probe(messages=messages, reference=answer, values=[answer, *aliases],
                        tags={"source": "probe"}))
  if not probes:
    raise ValueError(f"config.eval.probe={path!r} has no probes")
  return probes


def _rates(rows: list[tuple[bool, bool]]) -> dict:
  n = len(rows)
  return {"exact": sum(e for e, _ in rows) / n if n else 0.0,
          "contains": sum(c for _, c in rows) / n if n else 0.0, "count": n}


def summarize(probes: Sequence[Probe], answers: Sequence[str]) -> dict:
  """Overall rates, rates per group (qa, bio, and their combinations) and per attribute."""
  if len(probes) != len(answers):
    raise ValueError(f"{len(answers)} answers for {len(probes)} probes")
  judged = [judge(a, p) for p, a in zip(probes, answers)]
  out = {"all": _rates(judged)}
  buckets: dict[str, list] = {}
  for p, j in zip(probes, judged):
    keys = []
    if "qa" in p.tags:
      qa, bio = p.tags["qa"], p.tags["bio"]
      keys = [f"qa_{qa}", f"bio_{bio}", f"qa_{qa}+bio_{bio}",
              f"qa_{qa}+attr_{p.tags['attribute']}"]
    for key in keys:
      buckets.setdefault(key, []).append(j)
  out.update({k: _rates(v) for k, v in sorted(buckets.items())})
  return out
