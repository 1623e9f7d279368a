"""Eval metrics against hand-computed values and maintained implementations (rouge-score with a
custom tokenizer, nltk's sentence_bleu), plus the task data readers' errors. No model here."""

import random
import re
import warnings

import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_score import rouge_scorer, tokenizers

from configs import data as data_config
from llm_jax.data.builtin import bios
from llm_jax.eval import choice, knowledge, repetition, rouge
from llm_jax.eval import tasks as tasks_lib


# ---- rouge / bleu -------------------------------------------------------------------------------

def test_tokenizers_keep_chinese():
  assert rouge.tokenize("李白是唐代诗人。Li Bai, a poet!", "auto") == \
      ["李", "白", "是", "唐", "代", "诗", "人", "li", "bai", "a", "poet"]
  assert rouge.tokenize("猫 坐。", "char") == ["猫", "坐", "。"]
  assert rouge.tokenize("The cat, sat.", "word") == ["the", "cat", "sat"]
  with pytest.raises(ValueError, match="rouge_tokenizer"):
    rouge.tokenize("x", "bpe")


def test_rouge_hand_computed_english():
  hyp, ref = "the cat sat on the mat", "the cat lay on the mat"
  s = rouge.score(hyp, ref, "word")
  # 6 tokens each; unigram overlap: the x2, cat, on, mat = 5 -> P = R = F = 5/6.
  assert s["rouge1"] == pytest.approx(5 / 6, abs=1e-12)
  # bigrams: hyp {the cat, cat sat, sat on, on the, the mat}, ref {the cat, cat lay, lay on,
  # on the, the mat}: overlap 3 of 5 -> 3/5.
  assert s["rouge2"] == pytest.approx(3 / 5, abs=1e-12)
  # LCS "the cat on the mat" = 5 -> 5/6.
  assert s["rougeL"] == pytest.approx(5 / 6, abs=1e-12)


def test_rouge_hand_computed_chinese():
  s = rouge.score("李白是诗人", "李白是唐代诗人", "auto")
  # hyp 5 chars, ref 7, all 5 in ref in order: P = 1, R = 5/7, F = 2*(5/7)/(1+5/7) = 10/12.
  assert s["rouge1"] == pytest.approx(10 / 12, abs=1e-12)
  assert s["rougeL"] == pytest.approx(10 / 12, abs=1e-12)
  # bigrams: hyp {李白, 白是, 是诗, 诗人}, ref {李白, 白是, 是唐, 唐代, 代诗, 诗人}: 3 shared.
  p, r = 3 / 4, 3 / 6
  assert s["rouge2"] == pytest.approx(2 * p * r / (p + r), abs=1e-12)


def test_empty_and_identical():
  for how in ("auto", "char", "word"):
    empty = rouge.score("", "李白 is a poet", how)
    assert empty == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "bleu4": 0.0}
    same = rouge.score("李白是唐代的诗人 he wrote many poems", "李白是唐代的诗人 he wrote many poems", how)
    assert same == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "bleu4": 1.0})


def test_bleu_hand_computed():
  # hyp a b c d e, ref a b c d f: p1 = 4/5, p2 = 3/4, p3 = 2/3, p4 = 1/2, c = r -> BP = 1.
  got = rouge.bleu4(list("abcde"), list("abcdf"))
  assert got == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, abs=1e-12)
  # No 3-/4-gram match: method 3 gives 1/(2*3) and 1/(4*2).
  got = rouge.bleu4(list("abxcd"), list("abycd"))
  want = (4 / 5 * 2 / 4 * (1 / 6) * (1 / 8)) ** 0.25
  assert got == pytest.approx(want, abs=1e-12)


class _SpaceTokenizer(tokenizers.Tokenizer):
  """rouge-score sees our tokens joined by spaces (its default tokenizer drops non-ASCII)."""

  def tokenize(self, text):
    return text.split()


def _random_pairs(n=60, seed=0):
  rng = random.Random(seed)
  zh = list("李白杜甫是唐代的诗人写了很多诗歌月亮床前明光")
  en = "the cat sat on a mat dog ran in park poet wrote many poems".split()
  pairs = []
  for _ in range(n):
    if rng.random() < 0.5:
      mk = lambda: "".join(rng.choice(zh) for _ in range(rng.randint(0, 14)))
    else:
      mk = lambda: " ".join(rng.choice(en) for _ in range(rng.randint(0, 12)))
    pairs.append((mk(), mk()))
  return pairs


@pytest.mark.parametrize("how", ["auto", "char", "word"])
def test_rouge_equals_rouge_score_package(how):
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_SpaceTokenizer())
  for hyp, ref in _random_pairs():
    ours = rouge.score(hyp, ref, how)
    theirs = scorer.score(" ".join(rouge.tokenize(ref, how)), " ".join(rouge.tokenize(hyp, how)))
    for k in ("rouge1", "rouge2", "rougeL"):
      assert abs(ours[k] - theirs[k].fmeasure) <= 1e-6, (hyp, ref, k)


@pytest.mark.parametrize("how", ["auto", "word"])
def test_bleu_equals_nltk_method3(how):
  smooth = SmoothingFunction().method3
  checked = 0
  for hyp, ref in _random_pairs(seed=1):
    h, r = rouge.tokenize(hyp, how), rouge.tokenize(ref, how)
    if not h or not r:
      continue
    with warnings.catch_warnings():  # nltk warns about hypotheses without 4-grams
      warnings.simplefilter("ignore")
      theirs = sentence_bleu([r], h, smoothing_function=smooth)
    assert abs(rouge.bleu4(h, r) - theirs) <= 1e-6, (hyp, ref)
    checked += 1
  assert checked > 30


def test_corpus_scores_are_means():
  res = rouge.corpus_scores(["a b", ""], ["a b", "c"], "word")
  assert res["rouge1"] == 0.5 and res["examples"] == 2 and res["tokenizer"] == "word"


# ---- repetition ---------------------------------------------------------------------------------

def test_seq_rep_n_known_values():
  assert repetition.seq_rep_n([1, 2, 3, 4, 5, 6], 4) == 0.0
  # 1 2 1 2 1 2 1 2: 4-grams (1212, 2121) x: 5 grams, 2 unique -> 1 - 2/5.
  assert repetition.seq_rep_n([1, 2] * 4, 4) == pytest.approx(1 - 2 / 5)
  assert repetition.seq_rep_n([7] * 10, 4) == pytest.approx(1 - 1 / 7)
  assert repetition.seq_rep_n([1, 2, 3], 4) is None
  assert repetition.mean_seq_rep_n([[1, 2] * 4, [1, 2, 3, 4, 5], [1]], 4) == pytest.approx(0.3)
  assert repetition.mean_seq_rep_n([[1], [], [2, 3]], 4) is None  # undefined, not "no repetition"


def test_distinct_and_loops():
  assert repetition.distinct_n([[1, 2, 1], [2, 3]], 1) == pytest.approx(3 / 5)
  assert repetition.distinct_n([[1, 2, 1], [2, 3]], 2) == pytest.approx(3 / 3)
  assert repetition.ends_in_loop([9, 8] + [1, 2, 3] * 6, window=12)
  assert not repetition.ends_in_loop([1, 2, 3] * 3 + [4, 5, 6, 7], window=12)
  assert not repetition.ends_in_loop([5] * 5, window=12)  # too short to tell
  m = repetition.continuation_metrics([[1, 2] * 10, [1, 2] * 10, list(range(20))],
                                      [False, True, False], n=4, loop_window=8)
  assert m["loop_share"] == pytest.approx(1 / 3)  # the second stopped on its own


def test_rep_l_known_answer():
  # Ground truth x = 5 6 7 5 6 8; predictions at positions 0..4 (guesses of x1..x5).
  x = [5, 6, 7, 5, 6, 8]
  inputs, targets = [x[:-1]], [x[1:]]
  pred = [[6, 5, 9, 7, 8]]
  # position t, window l=2 holds x[t-1..t]: t0 {5}: 6 no; t1 {5,6}: 5 yes; t2 {6,7}: 9 no;
  # t3 {7,5}: 7 yes; t4 {5,6}: 8 no. l=16 sees everything so far: t3 7 in {5,6,7,5} yes; t4 no.
  c = repetition.rep_l(pred, inputs, targets, [[1, 1, 1, 1, 1]], [2, 16])
  assert c["positions"] == 5 and c["rep/2"] == 2 and c["rep/16"] == 2
  # Wrong and repeated: t1 predicts 5 (truth 7) -> wrong; t3 predicts 7 (truth 6) -> wrong.
  assert c["wrep/2"] == 2
  # Only weighted positions count.
  c = repetition.rep_l(pred, inputs, targets, [[0, 0, 0, 1, 1]], [2])
  assert c["positions"] == 2 and c["rep/2"] == 1
  assert repetition.finish_rep_l(c, [2])["rep_2"] == 0.5


# ---- knowledge ----------------------------------------------------------------------------------

def _syn(**kw):
  cfg = data_config.get_config().synthetic
  cfg.n_entities = 40
  cfg.update(kw)
  return cfg


def test_knowledge_right_answers_score_100_wrong_0():
  probes = knowledge.encyclopedia_probes(_syn(unseen_fraction=0.25))
  right = knowledge.summarize(probes, [p.reference for p in probes])
  assert right["all"] == {"exact": 1.0, "contains": 1.0, "count": len(probes)}
  for key in ("qa_trained", "qa_heldout", "bio_seen", "bio_unseen"):
    assert right[key]["exact"] == 1.0 and right[key]["count"] > 0, key
  wrong = knowledge.summarize(probes, ["I do not know."] * len(probes))
  assert wrong["all"]["exact"] == 0.0 and wrong["all"]["contains"] == 0.0
  # Another person's answer to the same attribute rarely contains the value, never exactly.
  shifted = knowledge.summarize(probes, [probes[(i + 12) % len(probes)].reference
                                         for i in range(len(probes))])
  assert shifted["all"]["exact"] == 0.0


def test_knowledge_groups_follow_the_data():
  d = bios.generate(_syn(unseen_fraction=0.25))
  probes = knowledge.encyclopedia_probes(_syn(unseen_fraction=0.25))
  n_attr, n_lang = len(bios.ATTRIBUTES), 2
  assert len(probes) == 40 * n_attr * n_lang
  held = sum(p.tags["qa"] == "heldout" for p in probes)
  unseen = sum(p.tags["bio"] == "unseen" for p in probes)
  assert held == len(d["heldout"]) * n_attr * n_lang and unseen == 10 * n_attr * n_lang
  few = knowledge.encyclopedia_probes(_syn(unseen_fraction=0.25), max_people=1)
  groups = {(p.tags["qa"], p.tags["bio"]) for p in few}
  assert len(few) == len(groups) * n_attr * n_lang and len(groups) == 4


def test_knowledge_judge_normalises():
  p = knowledge.Probe([], "Li Na was born in Hangzhou.", ["Hangzhou"], {})
  assert knowledge.judge("  li na was born in  HANGZHOU ", p) == (True, True)
  assert knowledge.judge("She is from Hangzhou, I think", p) == (False, True)
  q = knowledge.Probe([], "李娜出生于1990年3月5日。", ["1990年3月5日"], {})
  assert knowledge.judge("李娜出生于1990年3月5日", q) == (True, True)
  assert knowledge.judge("李娜出生于1990年3月15日。", q) == (False, False)


def test_probe_file_errors_name_line(tmp_path):
  f = tmp_path / "probe.jsonl"
  f.write_text('{"question": "Q?", "answer": "A"}\n\n{"question": "Q2?"}\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"probe.jsonl:3: field 'answer'"):
    knowledge.read_probe_file(str(f))


# ---- augmentation and unseen people -------------------------------------------------------------

def _value_order(person, text):
  """The attribute order a biography tells them in (each sentence matched to its template)."""
  order = []
  for sentence in re.split(r"(?<=\.) (?=[A-Z])", text):
    order += [a for a in bios.ATTRIBUTES
              if any(t.format(name=person["name"]["en"], v=person[a]["en"]) == sentence
                     for t in bios.BIO_TEMPLATES["en"][a])][:1]
  return tuple(order)


def test_augment_multi_and_permute():
  base = bios.generate(_syn(languages="en"))
  single = bios.generate(_syn(languages="en", augment="single"))
  multi = bios.generate(_syn(languages="en", augment="multi5"))
  perm = bios.generate(_syn(languages="en", augment="multi5+permute"))
  assert len(single["bios"]) == 40 and len(multi["bios"]) == len(perm["bios"]) == 200
  for d in (single, multi, perm):  # QA, people and eval biographies do not change
    assert d["qa_train"] == base["qa_train"] and d["people"] == base["people"]
    assert d["bios_eval"] == base["bios_eval"]
  people = base["people"]
  # Without permute, every biography tells the attributes in the canonical order; with it, the
  # orders vary. Biography i belongs to person i // 5.
  assert all(_value_order(people[i // 5], b["text"]) == bios.ATTRIBUTES
             for i, b in enumerate(multi["bios"]))
  orders = {_value_order(people[i // 5], b["text"]) for i, b in enumerate(perm["bios"])}
  assert len(orders) > 20
  # A person's five biographies are different phrasings of the same facts.
  assert len({b["text"] for b in multi["bios"][:5]}) > 1
  with pytest.raises(ValueError, match="augment"):
    bios.generate(_syn(augment="multi5+shuffle"))


def test_unseen_people_have_no_biography_but_keep_their_qa():
  d = bios.generate(_syn(languages="en", unseen_fraction=0.25))
  base = bios.generate(_syn(languages="en"))
  assert len(d["unseen"]) == 10 and d["heldout"] == base["heldout"]
  assert d["qa_train"] == base["qa_train"] and d["qa_heldout"] == base["qa_heldout"]
  text = " ".join(b["text"] for b in d["bios"] + d["bios_eval"])
  for k in d["unseen"]:
    assert f"{d['people'][k]['name']['en']} " not in text
  assert len(d["bios"]) == 30 * 3


# ---- multiple choice files and reference sets ---------------------------------------------------

def test_choice_csv_and_jsonl_read(tmp_path):
  ceval = tmp_path / "ceval.csv"
  ceval.write_text("id,question,A,B,C,D,answer,explanation\n"
                   '0,"1+1=?",1,2,3,4,B,\n1,李白是哪个朝代的？,唐,宋,元,明,A,x\n', encoding="utf-8")
  qs = choice.read_questions(str(ceval))
  assert [q.answer for q in qs] == [1, 0] and qs[1].choices == ["唐", "宋", "元", "明"]
  assert choice.resolve_style("auto", qs) == "en"  # one of two is Chinese: not most
  mmlu = tmp_path / "mmlu.csv"
  mmlu.write_text("What is 2+2?,3,4,5,6,B\n", encoding="utf-8")
  assert choice.read_questions(str(mmlu))[0].choices == ["3", "4", "5", "6"]
  js = tmp_path / "q.jsonl"
  js.write_text('{"question": "x?", "choices": ["a", "b"], "answer": 1}\n'
                '{"question": "y?", "A": "a", "B": "b", "answer": "A"}\n', encoding="utf-8")
  assert [q.answer for q in choice.read_questions(str(js))] == [1, 0]


@pytest.mark.parametrize("content, match", [
    ("question,A,B,C,D,answer\nq1,a,b,c,d,A\nq2,a,b,c,d,E\n", r"bad.csv:3: field 'answer'='E'"),
    ("question,A,B,C,D,answer\nq1,a,b,c,d,A\nq2,a,b\n", r"bad.csv:3: has 3 columns"),
    ("question,A,B,C,D,answer\n\nq1,a,,c,d,A\n", r"bad.csv:3: choice B is empty"),
])
def test_malformed_choice_row_names_file_and_line(tmp_path, content, match):
  f = tmp_path / "bad.csv"
  f.write_text(content, encoding="utf-8")
  with pytest.raises(ValueError, match=match):
    choice.read_questions(str(f))


def test_malformed_choice_jsonl_names_line(tmp_path):
  f = tmp_path / "bad.jsonl"
  f.write_text('{"question": "x", "choices": ["a", "b"], "answer": 0}\n{"question": "y", '
               '"choices": ["a", "b"], "answer": 5}\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'answer'=5"):
    choice.read_questions(str(f))


def test_choice_prompt_and_lm_eval_split():
  q = choice.Question("What is 2+2?", ["3", "4"], 1, "x")
  shot = choice.Question("What is 1+1?", ["2", "5"], 0, "y")
  assert choice.context(q, [shot], "en") == (
      "What is 1+1?\nA. 2\nB. 5\nAnswer: A\n\nWhat is 2+2?\nA. 3\nB. 4\nAnswer:")
  assert choice.continuations(q) == [" A", " B"]
  assert choice.context(q, [], "zh", "cloze") == "问题：What is 2+2?\n答案："
  assert choice.continuations(q, "cloze") == [" 3", " 4"]

  class CharTok:  # encodes characters, but merges " A" into one id (like a BPE would)
    def encode(self, s):
      out, i = [], 0
      while i < len(s):
        if s[i:i + 2] == " A":
          out.append(1000)
          i += 2
        else:
          out.append(ord(s[i]))
          i += 1
      return out
  # Trailing spaces of the context move to the continuation, then the whole is encoded once.
  assert choice.encode_pair(CharTok(), "Answer: ", "A") == ([ord(c) for c in "Answer:"], [1000])
  acc = choice.accuracy([[-1.0, -2.0], [-3.0, -0.5]], [q, q])
  assert acc["acc"] == 0.5 and acc["questions"] == 2
  # Guessing: 1/2 on each two-choice question, 1/4 on a four-choice one.
  four = choice.Question("Which?", ["a", "b", "c", "d"], 0, "z")
  assert choice.accuracy([[0.0, -1.0], [0.0, -1.0, -2.0, -3.0]], [q, four])["chance"] == 0.375


def test_reference_set_skips_and_counts_empty_answers(tmp_path):
  f = tmp_path / "refs.jsonl"
  f.write_text('{"prompt": "李白是谁？", "reference": "唐代诗人。"}\n'
               '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", '
               '"content": "  "}]}\n'
               '{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": '
               '"A1"}, {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]}\n',
               encoding="utf-8")
  cfg = data_config.get_config()
  records, skipped = tasks_lib.read_references(str(f), cfg)
  assert skipped == 1 and len(records) == 2
  assert records[0]["messages"] == [{"role": "user", "content": "李白是谁？"}]
  assert records[1]["reference"] == "A2" and len(records[1]["messages"]) == 3
  f.write_text('{"prompt": "x", "reference": ""}\n', encoding="utf-8")
  with pytest.raises(ValueError, match="no usable reference"):
    tasks_lib.read_references(str(f), cfg)
