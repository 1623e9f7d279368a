"""Multiple-choice accuracy by log-likelihood, scored the way lm-evaluation-harness scores MMLU
and C-Eval, so the same file gives the same accuracy through either.

Files (config.eval.choice_file):
  CSV   with a header naming `question`, the choice columns `A`, `B`, ... and `answer` (C-Eval,
        CMMLU; case-insensitive, other columns such as id / explanation ignored), or without a
        header as question, A, B, C, D, answer (MMLU's raw CSVs). The answer is a letter.
  JSONL {"question", "choices": [...] or "A"/"B"/..., "answer": letter or 0-based index}.
  builtin:bios_choice  questions about the embedded encyclopedia's people (the tiny example set).

The prompt of a question, `letters` format (lm-eval's mmlu / ceval templates; style en or zh):
  [description]{shot 1} {answer 1}\\n\\n...{question}\\nA. {A}\\nB. {B}\\n...\\nAnswer:
with "答案：" instead of "Answer:" for zh; the continuation of choice k is " " + letter k.
`cloze` format (lm-eval's arc / hellaswag style, for models too small to map letters): the
prompt is "Question: {question}\\nAnswer:" ("问题：…\\n答案：") and the continuation of choice k
is " " + its text.
Each continuation's log-likelihood is the sum of log p over its tokens after the context; the
context/continuation split is lm-eval's: encode(context + continuation) minus encode(context)'s
length. acc = argmax of the log-likelihoods (first on ties), acc_norm = argmax of log-likelihood
per character of the choice (equal to acc for single-letter choices); chance = the mean over the
questions of 1 / their number of choices (the accuracy of guessing).
"""

from __future__ import annotations

import csv
import dataclasses
import random
import re
import string
from typing import Sequence

import numpy as np

from llm_jax.data.builtin import bios
from llm_jax.data.sources import read_records

BUILTIN = "builtin:bios_choice"
STYLES = ("auto", "en", "zh")
FORMATS = ("letters", "cloze")
_CJK_RE = re.compile(r"[\u3400-\u9fff]")


@dataclasses.dataclass
class Question:
  question: str
  choices: list[str]
  answer: int  # index into choices
  where: str  # file:line, for messages
  subject: str = ""


def _fail(where: str, why: str):
  raise ValueError(f"{where}: {why}")


def _answer_index(value, n_choices: int, where: str, allow_int: bool) -> int:
  if allow_int and isinstance(value, int) and not isinstance(value, bool):
    if 0 <= value < n_choices:
      return value
    _fail(where, f"field 'answer'={value} is not a choice index in [0, {n_choices})")
  if isinstance(value, str) and value.strip().upper() in string.ascii_uppercase[:n_choices]:
    return string.ascii_uppercase.index(value.strip().upper())
  letters = ", ".join(string.ascii_uppercase[:n_choices])
  _fail(where, f"field 'answer'={value!r} is not one of the choice letters {letters}"
        + (" (or a 0-based index)" if allow_int else ""))


def _check(q: Question) -> Question:
  if not q.question.strip():
    _fail(q.where, "field 'question' is empty")
  if len(q.choices) < 2:
    _fail(q.where, f"needs at least 2 choices, found {len(q.choices)}")
  for k, c in enumerate(q.choices):
    if not c.strip():
      _fail(q.where, f"choice {string.ascii_uppercase[k]} is empty")
  return q


def _read_csv(path: str) -> list[Question]:
  out = []
  with open(path, encoding="utf-8-sig", newline="") as f:
    reader = csv.reader(f)
    header, columns = None, None
    line = 1
    for row in reader:
      where, line = f"{path}:{line}", reader.line_num + 1  # a row may span several lines
      if not any(cell.strip() for cell in row):
        continue
      if header is None:
        lower = [c.strip().lower() for c in row]
        header = row
        if "question" in lower and "answer" in lower:
          letters = [c for c in lower if len(c) == 1 and c in string.ascii_lowercase]
          columns = {"question": lower.index("question"), "answer": lower.index("answer"),
                     "choices": [lower.index(c) for c in sorted(letters)],
                     "subject": lower.index("subject") if "subject" in lower else None}
          if len(columns["choices"]) < 2:
            _fail(where, "the header names no choice columns (A, B, C, D)")
          continue
        columns = None  # no header: question, A, B, C, D, answer
      if columns is None:
        if len(row) < 4:
          _fail(where, f"expected question, choices and answer columns, found {len(row)} column"
                "s (a row with an unquoted comma?)")
        question, choices, answer = row[0], row[1:-1], row[-1]
        subject = ""
      else:
        need = max(columns["question"], columns["answer"], *columns["choices"])
        if len(row) <= need:
          _fail(where, f"has {len(row)} columns, the header has {len(header)}")
        question, answer = row[columns["question"]], row[columns["answer"]]
        choices = [row[c] for c in columns["choices"]]
        subject = row[columns["subject"]] if columns["subject"] is not None else ""
      out.append(_check(Question(question, choices, _answer_index(answer, len(choices), where,
                                                                  False), where, subject)))
  return out


def _read_jsonl(path: str) -> list[Question]:
  out = []
  for where, rec in read_records(path):
    question = rec.get("question")
    if not isinstance(question, str):
      _fail(where, "field 'question' is missing or not a string")
    if "choices" in rec:
      choices = rec["choices"]
      if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        _fail(where, "field 'choices' must be a list of strings")
    else:
      choices = []
      for letter in string.ascii_uppercase:
        if letter not in rec:
          break
        if not isinstance(rec[letter], str):
          _fail(where, f"field {letter!r} is not a string")
        choices.append(rec[letter])
      if not choices:
        _fail(where, "no choices: give 'choices': [...] or fields 'A', 'B', ...")
    if "answer" not in rec:
      _fail(where, "field 'answer' is missing")
    answer = _answer_index(rec["answer"], len(choices), where, True)
    out.append(_check(Question(question, list(choices), answer, where,
                               str(rec.get("subject", "")))))
  return out


def builtin_questions(synthetic_cfg, limit: int = 0) -> list[Question]:
  """Four-way questions about the encyclopedia's people: one attribute per person (rotating),
  the true value and three other values of that attribute as distractors."""
  data = bios.generate(synthetic_cfg)
  langs = [s.strip() for s in synthetic_cfg.languages.split(",") if s.strip()]
  rng = random.Random(f"{synthetic_cfg.seed}-choice")
  out = []
  for k, person in enumerate(data["people"]):
    lang = langs[k % len(langs)]
    attribute = bios.ATTRIBUTES[k % len(bios.ATTRIBUTES)]
    truth = person[attribute][lang]
    pool = sorted({p[attribute][lang] for p in data["people"]} - {truth})
    choices = rng.sample(pool, 3) + [truth]
    rng.shuffle(choices)
    question = bios.QUESTIONS[lang][attribute][0].format(name=person["name"][lang])
    out.append(Question(question, choices, choices.index(truth), f"{BUILTIN} (record {k})"))
    if limit and len(out) >= limit:
      break
  return out


def read_questions(path: str, synthetic_cfg=None) -> list[Question]:
  """Questions of a CSV / JSONL file or the built-in set; malformed rows fail naming file:line."""
  if path == BUILTIN:
    return builtin_questions(synthetic_cfg)
  try:
    if path.endswith(".csv"):
      questions = _read_csv(path)
    elif path.endswith((".jsonl", ".json")):
      questions = _read_jsonl(path)
    else:
      raise ValueError(f"config.eval.choice_file={path!r}: use a .csv or .jsonl file, or "
                       f"{BUILTIN}")
  except FileNotFoundError:
    raise ValueError(f"config.eval.choice_file={path!r}: no such file") from None
  if not questions:
    raise ValueError(f"config.eval.choice_file={path!r} has no questions")
  return questions


def resolve_style(style: str, questions: Sequence[Question]) -> str:
  if style not in STYLES:
    raise ValueError(f"config.eval.choice_style={style!r}; use one of {STYLES}")
  if style != "auto":
    return style
  zh = sum(bool(_CJK_RE.search(q.question)) for q in questions)
  return "zh" if zh * 2 > len(questions) else "en"


def _body(q: Question, style: str, fmt: str) -> str:
  if fmt == "cloze":
    return f"问题：{q.question.strip()}\n答案：" if style == "zh" else \
        f"Question: {q.question.strip()}\nAnswer:"
  lines = [q.question.strip()]
  lines += [f"{string.ascii_uppercase[k]}. {c}" for k, c in enumerate(q.choices)]
  return "\n".join(lines) + ("\n答案：" if style == "zh" else "\nAnswer:")


def _description(subject: str, style: str) -> str:
  if not subject:
    return ""
  subject = subject.replace("_", " ")
  if style == "zh":
    return f"以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
  return f"The following are multiple choice questions (with answers) about {subject}.\n\n"


def choice_texts(q: Question, fmt: str) -> list[str]:
  """lm-eval's doc_to_choice: the letters, or (cloze) the choices' own texts."""
  if fmt == "cloze":
    return [c.strip() for c in q.choices]
  return list(string.ascii_uppercase[:len(q.choices)])


def context(q: Question, shots: Sequence[Question], style: str, fmt: str = "letters") -> str:
  """The prompt before the answer; `shots` are solved examples shown first."""
  if fmt not in FORMATS:
    raise ValueError(f"config.eval.choice_format={fmt!r}; use one of {FORMATS}")
  parts = [f"{_body(s, style, fmt)} {choice_texts(s, fmt)[s.answer]}" for s in shots]
  return _description(q.subject, style) + "".join(p + "\n\n" for p in parts) + _body(q, style, fmt)


def continuations(q: Question, fmt: str = "letters") -> list[str]:
  """lm-eval's target delimiter " " before each choice."""
  return [" " + c for c in choice_texts(q, fmt)]


def shots_for(index: int, questions: Sequence[Question], dev: Sequence[Question], k: int
              ) -> list[Question]:
  """k solved examples: the first k of the dev set if there is one, else the first k other
  questions of the same file (never the question itself)."""
  if k <= 0:
    return []
  pool = list(dev) if dev else [q for i, q in enumerate(questions) if i != index]
  return pool[:k]


def encode_pair(tok, ctx: str, continuation: str) -> tuple[list[int], list[int]]:
  """lm-evaluation-harness's split: trailing spaces of the context move to the continuation, the
  whole string is encoded once, and the continuation is what follows the context's tokens."""
  n_spaces = len(ctx) - len(ctx.rstrip())
  if n_spaces:
    continuation, ctx = ctx[-n_spaces:] + continuation, ctx[:-n_spaces]
  whole = tok.encode(ctx + continuation)
  ctx_ids = tok.encode(ctx)
  return whole[:len(ctx_ids)], whole[len(ctx_ids):]


def accuracy(logliks: Sequence[Sequence[float]], questions: Sequence[Question],
             fmt: str = "letters") -> dict:
  """acc and acc_norm from each question's per-choice log-likelihoods (lm-eval's definitions:
  acc_norm divides by the character length of the choice text, without the delimiter)."""
  correct = correct_norm = 0
  for ll, q in zip(logliks, questions):
    ll = np.asarray(ll, np.float64)
    lengths = np.asarray([len(c) for c in choice_texts(q, fmt)], np.float64)
    correct += int(np.argmax(ll)) == q.answer
    correct_norm += int(np.argmax(ll / lengths)) == q.answer
  n = len(questions)
  # The accuracy of guessing: what the plots draw as the chance line.
  chance = sum(1 / len(q.choices) for q in questions) / n if n else 0.0
  return {"acc": correct / n if n else 0.0, "acc_norm": correct_norm / n if n else 0.0,
          "questions": n, "chance": chance}
