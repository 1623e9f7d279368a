"""The embedded encyclopedia: deterministic, consistent facts, held-out split, text hygiene."""

import re

import pytest

from configs import data as data_config
from llm_jax.data.builtin import bios
from llm_jax.data import text_clean


def _cfg(**kw):
  cfg = data_config.get_config().synthetic
  cfg.n_entities = 80
  cfg.update(kw)
  return cfg


def test_deterministic_and_seeded():
  a = bios.generate(_cfg())
  bios._generate.cache_clear()
  b = bios.generate(_cfg())
  assert a == b and a is not b
  assert bios.generate(_cfg(seed=99))["bios"] != a["bios"]


def test_sizes_follow_config():
  cfg = _cfg(bios_per_entity=2, multi_turn_per_entity=2, heldout_fraction=0.25)
  d = bios.generate(cfg)
  n, langs, attrs = 80, 2, len(bios.ATTRIBUTES)
  assert len(d["people"]) == n and len(d["heldout"]) == 20
  assert len(d["bios"]) == n * langs * 2 and len(d["bios_eval"]) == n * langs
  assert len(d["qa_train"]) == 60 * langs * (attrs + 2)
  assert len(d["qa_heldout"]) == 20 * langs * (attrs + 2)
  en_only = bios.generate(_cfg(languages="en"))
  assert all(re.fullmatch(r"[\x20-\x7e]+", r["text"]) for r in en_only["bios"])


def test_heldout_people_never_in_training_qa_but_in_bios():
  d = bios.generate(_cfg())
  heldout = {lang: {d["people"][k]["name"][lang] for k in d["heldout"]} for lang in ("zh", "en")}
  train_text = " ".join(m["content"] for c in d["qa_train"] for m in c["messages"])
  heldout_text = " ".join(m["content"] for c in d["qa_heldout"] for m in c["messages"])
  for lang in ("zh", "en"):
    for name in heldout[lang]:
      # Names may be substrings of longer names ("Li Na" in "Xili Na"), so match whole names.
      pattern = (rf"(?<![A-Za-z]){re.escape(name)}(?![A-Za-z])" if lang == "en"
                 else rf"{re.escape(name)}(?=[是的出在毕就来主学获受曾现工为于生哪？])")
      assert re.search(pattern, heldout_text)
      assert any(re.search(pattern, b["text"]) for b in d["bios"])
      if lang == "en":
        assert not re.search(pattern, train_text), name


def test_every_answer_is_a_fact_stated_in_that_persons_biographies():
  d = bios.generate(_cfg())
  by_name = {}
  for person in d["people"]:
    for lang in ("zh", "en"):
      by_name[person["name"][lang]] = (person, lang)
  for chat in d["qa_train"][:200] + d["qa_heldout"][:200]:
    answers = [m["content"] for m in chat["messages"] if m["role"] == "assistant"]
    for answer in answers:
      matches = [(p, lang) for name, (p, lang) in by_name.items() if answer.startswith(name)]
      person, lang = max(matches, key=lambda pl: len(pl[0]["name"][pl[1]]))
      values = [person[a][lang] for a in bios.ATTRIBUTES]
      assert any(v in answer for v in values)


def test_templates_per_attribute_limits_sentence_variety():
  d = bios.generate(_cfg(templates_per_attribute=1, languages="en"))
  first = [bios.BIO_TEMPLATES["en"][a][0] for a in bios.ATTRIBUTES]
  shapes = {re.escape(t).replace(r"\{name\}", ".+").replace(r"\{v\}", ".+") for t in first}
  for bio in d["bios"][:50]:
    for sentence in re.split(r"(?<=\.) (?=[A-Z])", bio["text"]):
      assert any(re.fullmatch(s, sentence) for s in shapes), sentence


def test_qa_phrasings_ask_each_fact_that_many_ways():
  """qa_phrasings=4 (the quick start's): every person's every fact is asked in 4 different
  question phrasings with the one canonical answer; 1 keeps the data of older versions."""
  one, four = bios.generate(_cfg(qa_phrasings=1)), bios.generate(_cfg(qa_phrasings=4))
  assert one == bios.generate(_cfg())  # the default is 1, unchanged draws
  single = lambda d: [c for c in d["qa_train"] if len([m for m in c["messages"]
                                                       if m["role"] == "user"]) == 1]
  assert len(single(four)) == 4 * len(single(one))
  assert one["heldout"] == four["heldout"] and one["people"] == four["people"]
  asked = {}
  for chat in single(four):
    question, answer = [m["content"] for m in chat["messages"] if m["role"] != "system"]
    asked.setdefault(answer, set()).add(question)
  assert len(asked) == len(single(one)) and all(len(q) == 4 for q in asked.values())


@pytest.mark.parametrize("field, value, match", [
    ("templates_per_attribute", 6, "templates_per_attribute"),
    ("qa_phrasings", 5, "qa_phrasings"),
    ("languages", "fr", "languages"),
    ("heldout_fraction", 1.0, "heldout_fraction"),
    ("n_entities", 10**7, "too many"),
])
def test_bad_synthetic_config_is_a_clear_error(field, value, match):
  with pytest.raises(ValueError, match=match):
    bios.generate(_cfg(**{field: value}))


def test_clean_markup_removes_empty_brackets_and_markup():
  raw = ("《战国无双3》（）是由光荣开发的游戏[[游戏|作品]]。{{cite web}}"
         "'''粗体'''<ref name=a>来源</ref>，( ; )与【】都删掉&nbsp;<br/>保留（内容）。")
  assert text_clean.clean_markup(raw) == (
      "《战国无双3》是由光荣开发的游戏作品。粗体，与都删掉 保留（内容）。")


def test_cut_at_sentences_never_cuts_mid_sentence_when_avoidable():
  text = "Pi is 3.14 exactly. 第二句。 Third sentence here! “引号句。”尾巴"
  pieces = text_clean.cut_at_sentences(text, 25)
  assert all(len(p) <= 25 for p in pieces)
  assert pieces == ["Pi is 3.14 exactly. 第二句。", "Third sentence here!", "“引号句。”尾巴"]
  # The period of 3.14 is not a sentence end; a closing quote stays with its sentence.
  assert text_clean.cut_at_sentences("Pi is 3.14 exactly", 10) == ["Pi is 3.14", "exactly"]
  assert text_clean.cut_at_sentences("“引号句。”尾巴", 6) == ["“引号句。”", "尾巴"]
  assert text_clean.cut_at_sentences("short.", 25) == ["short."]
  assert text_clean.cut_at_sentences("a" * 30, 10) == ["a" * 10] * 3  # no end: hard cut
