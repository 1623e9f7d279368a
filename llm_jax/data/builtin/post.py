"""Post-training sets of the embedded encyclopedia (bios.py), about the same people and
split the same way (pairs and traces about held-out people are only evaluated on):

  dpo_*   preference pairs in minimind's shape {"chosen": [messages], "rejected": [messages]}:
          a question about one attribute; chosen is the true answer in the SFT answer shape;
          rejected is either a hallucination (the same sentence with a wrong value) or an answer
          to a different question (another attribute of the same person). A quarter of the
          prompts open with an earlier question and its answer (multi-turn), some with a system
          turn, as in the QA set.
  r1_*    reasoning traces: the assistant content is "<think>\\nreasoning\\n</think>\\n\\nanswer"
          (reasoning.join). Recall questions reason "the question asks for X; the encyclopedia
          says ...; so ..."; one comparison per person ("does X work in the city of birth?")
          reasons over two facts before answering yes or no.

Generated from the encyclopedia's config and seed with Python's `random.Random`, in memory.
"""

from __future__ import annotations

import functools
import random

import ml_collections

from llm_jax.data import reasoning
from llm_jax.data.builtin import bios

SPLITS = ("dpo_train", "dpo_heldout", "r1_train", "r1_heldout")
TABLES = {"birth_city": bios.CITIES, "university": bios.UNIVERSITIES, "major": bios.FIELDS,
          "employer": bios.EMPLOYERS, "work_city": bios.CITIES}
ATTRIBUTE_NAMES = {
    "en": {"birth_date": "date of birth", "birth_city": "birthplace", "university": "university",
           "major": "field of study", "employer": "employer", "work_city": "city of work"},
    "zh": {"birth_date": "出生日期", "birth_city": "出生地", "university": "毕业院校",
           "major": "专业", "employer": "雇主", "work_city": "工作城市"},
}
SAME_CITY_QUESTIONS = {
    "en": ["Does {name} work in the city where {name} was born?",
           "Is {name}'s workplace in {name}'s hometown?"],
    "zh": ["{name}在自己出生的城市工作吗？", "{name}的工作地点在家乡吗？"],
}


def _answer(person: dict, attribute: str, lang: str, value: str | None = None) -> str:
  """The QA set's canonical answer sentence, optionally with another value."""
  v = person[attribute][lang] if value is None else value
  return bios.BIO_TEMPLATES[lang][attribute][0].format(name=person["name"][lang], v=v)


def _wrong_value(person: dict, attribute: str, lang: str, rng: random.Random) -> str:
  true = person[attribute][lang]
  while True:
    if attribute == "birth_date":
      year, month, day = rng.randint(1900, 2005), rng.randint(1, 12), rng.randint(1, 28)
      v = (f"{year}年{month}月{day}日" if lang == "zh"
           else f"{bios.MONTHS[month - 1]} {day}, {year}")
    else:
      v = rng.choice(TABLES[attribute])[0 if lang == "zh" else 1]
    if v != true:
      return v


def _question(person: dict, attribute: str, lang: str, n_templates: int, rng) -> str:
  return rng.choice(bios.QUESTIONS[lang][attribute][:n_templates]).format(name=person["name"][lang])


def _pair(person: dict, lang: str, attribute: str, cfg, rng: random.Random) -> dict:
  n = min(cfg.templates_per_attribute, len(bios.QUESTIONS[lang]["major"]))
  prompt = [{"role": "user", "content": _question(person, attribute, lang, n, rng)}]
  chosen = _answer(person, attribute, lang)
  if rng.random() < 0.5:  # a hallucinated fact in the right shape
    rejected = _answer(person, attribute, lang, _wrong_value(person, attribute, lang, rng))
  else:  # a true fact that answers another question
    other = rng.choice([a for a in bios.ATTRIBUTES if a != attribute])
    rejected = _answer(person, other, lang)
  if rng.random() < 0.25:
    earlier = rng.choice([a for a in bios.ATTRIBUTES if a != attribute])
    prompt = [{"role": "user", "content": _question(person, earlier, lang, n, rng)},
              {"role": "assistant", "content": _answer(person, earlier, lang)}] + prompt
  if rng.random() < cfg.system_prompt_prob:
    prompt = [{"role": "system", "content": bios.SYSTEM_PROMPTS[lang]}] + prompt
  return {"chosen": prompt + [{"role": "assistant", "content": chosen}],
          "rejected": prompt + [{"role": "assistant", "content": rejected}]}


def _recall_trace(person: dict, lang: str, attribute: str, cfg, rng: random.Random) -> dict:
  n = min(cfg.templates_per_attribute, len(bios.QUESTIONS[lang]["major"]))
  name, value = person["name"][lang], person[attribute][lang]
  fact = rng.choice(bios.BIO_TEMPLATES[lang][attribute][:n]).format(name=name, v=value)
  what = ATTRIBUTE_NAMES[lang][attribute]
  if lang == "zh":
    thought = f"问题问的是{name}的{what}。百科中写道：{fact}\n所以答案是{value}。"
  else:
    thought = f"The question asks for {name}'s {what}. The encyclopedia says: {fact}\n" \
              f"So the answer is {value}."
  return {"messages": [
      {"role": "user", "content": _question(person, attribute, lang, n, rng)},
      {"role": "assistant", "content": reasoning.join(thought, _answer(person, attribute, lang))}]}


def _same_city_trace(person: dict, lang: str, rng: random.Random) -> dict:
  name = person["name"][lang]
  born, works = person["birth_city"][lang], person["work_city"][lang]
  same = born == works
  if lang == "zh":
    thought = (f"{name}出生在{born}。{name}在{works}工作。"
               f"{born}和{works}{'是' if same else '不是'}同一座城市。")
    answer = (f"是的，{name}在出生地{born}工作。" if same
              else f"不是。{name}出生在{born}，但在{works}工作。")
  else:
    thought = (f"{name} was born in {born}. {name} works in {works}. "
               + (f"These are the same city." if same else f"{born} and {works} are different cities."))
    answer = (f"Yes, {name} works in {born}, the city of birth." if same
              else f"No. {name} was born in {born} but works in {works}.")
  question = rng.choice(SAME_CITY_QUESTIONS[lang]).format(name=name)
  return {"messages": [{"role": "user", "content": question},
                       {"role": "assistant", "content": reasoning.join(thought, answer)}]}


@functools.lru_cache(maxsize=4)
def _generate(key: tuple) -> dict:
  cfg = ml_collections.ConfigDict(dict(key))
  base = bios.generate(cfg)
  heldout = set(base["heldout"])
  rng_pairs, rng_traces = random.Random(f"{cfg.seed}-dpo"), random.Random(f"{cfg.seed}-r1")
  out = {s: [] for s in SPLITS}
  for k, person in enumerate(base["people"]):
    split = "heldout" if k in heldout else "train"
    for lang in bios.parse_languages(cfg):
      for attribute in bios.ATTRIBUTES:
        out[f"dpo_{split}"].append(_pair(person, lang, attribute, cfg, rng_pairs))
        out[f"r1_{split}"].append(_recall_trace(person, lang, attribute, cfg, rng_traces))
      out[f"r1_{split}"].append(_same_city_trace(person, lang, rng_traces))
  return out


def generate(synthetic_cfg) -> dict:
  """{"dpo_train", "dpo_heldout", "r1_train", "r1_heldout"} record lists; cached per config."""
  c = synthetic_cfg
  key = (("n_entities", int(c.n_entities)), ("bios_per_entity", int(c.bios_per_entity)),
         ("templates_per_attribute", int(c.templates_per_attribute)),
         ("heldout_fraction", float(c.heldout_fraction)),
         ("multi_turn_per_entity", int(c.multi_turn_per_entity)),
         ("system_prompt_prob", float(c.system_prompt_prob)), ("languages", str(c.languages)),
         ("seed", int(c.seed)), ("augment", str(c.get("augment", ""))),
         ("unseen_fraction", float(c.get("unseen_fraction", 0.0))))
  return _generate(key)
