"""Reading a model's reply as JSON, and checking each question-answer pair.

Small models wrap JSON in ``` fences, prefix it with a sentence, think aloud in <think> tags,
leave trailing commas, use single quotes, or stop mid-array. `parse_reply` takes the JSON out
of the reply and, when strict parsing fails, lets `json_repair` fix it (a truncated array keeps
its complete items; the torn last item fails the schema check). `check_pair` then applies the
schema, length limits and the grounding score, each failure named by a reason key that the
summary counts.
"""

from __future__ import annotations

import dataclasses
import json
import re
import unicodedata

import json_repair

_THINK = re.compile(r"<think>.*?(</think>|$)", re.S)
_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)(```|$)", re.S)
# Names small models use instead of "question"/"answer" (checked in this order).
QUESTION_KEYS = ("question", "q", "query", "instruction", "问题", "提问")
ANSWER_KEYS = ("answer", "a", "response", "output", "答案", "回答")

REASONS = {  # reason key -> what the summary prints
    "unparseable": "reply not readable as JSON",
    "schema": "not a {question, answer} object",
    "empty": "empty question or answer",
    "question_length": "question length out of limits",
    "answer_length": "answer length out of limits",
    "ungrounded": "answer not grounded in the chunk",
    "duplicate": "duplicate question",
    "judge_low": "judge score below threshold",
    "judge_unreadable": "judge reply unreadable",
}


def parse_reply(text: str | None):
  """(value, how) with how in {"json", "fenced", "repaired"}, or (None, "unparseable")."""
  if not text or not text.strip():
    return None, "unparseable"
  text = _THINK.sub("", text).strip()  # reasoning models (Qwen3, R1) think before answering
  how = "json"
  fence = _FENCE.search(text)
  if fence and fence.group(1).strip():
    text, how = fence.group(1).strip(), "fenced"
  body = _outer_json(text)
  if body is not None:
    try:
      return json.loads(body), how
    except json.JSONDecodeError:
      pass
  repaired = json_repair.loads(body if body is not None else text)
  if isinstance(repaired, (list, dict)) and repaired:
    return repaired, "repaired"
  return None, "unparseable"


def _outer_json(text: str) -> str | None:
  """The text from the first '[' or '{' to the last matching-kind closer (prose around JSON
  is dropped); None when there is no bracket at all."""
  starts = [i for i in (text.find("["), text.find("{")) if i >= 0]
  if not starts:
    return None
  start = min(starts)
  closer = "]" if text[start] == "[" else "}"
  end = text.rfind(closer)
  return text[start:end + 1] if end > start else text[start:]


def as_items(value) -> list:
  """The list of candidate pairs in a parsed reply: a list, {"pairs"|...: [...]}, or one pair."""
  if isinstance(value, list):
    return value
  if isinstance(value, dict):
    if _get(value, QUESTION_KEYS) is not None:
      return [value]
    lists = [v for v in value.values() if isinstance(v, list)]
    return lists[0] if len(lists) == 1 else [value]
  return [value]


def _get(item: dict, keys: tuple[str, ...]):
  lowered = {str(k).strip().lower(): v for k, v in item.items()}
  for key in keys:
    if key in lowered:
      return lowered[key]
  return None


_PUNCT_OR_SPACE = {"P", "Z", "S", "C"}  # unicode categories dropped when comparing texts


def normalize(text: str) -> str:
  """Comparison key: NFKC, lower case, punctuation/space/symbols removed."""
  text = unicodedata.normalize("NFKC", text).lower()
  return "".join(ch for ch in text if unicodedata.category(ch)[0] not in _PUNCT_OR_SPACE)


_CJK_RANGES = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
_CJK_CHAR = re.compile(f"[{_CJK_RANGES}]")
_UNIT = re.compile(f"[{_CJK_RANGES}]|[^\\W_{_CJK_RANGES}]+")  # one CJK character, or a word


def _grams(text: str) -> list[str]:
  """Units of comparison: each Latin/digit word, and each pair of adjacent CJK characters
  (single CJK characters such as 的/是 match almost any Chinese text; pairs are word-like)."""
  units = _UNIT.findall(unicodedata.normalize("NFKC", text).lower())
  grams, run = [], []
  for u in units + [""]:
    if u and _CJK_CHAR.fullmatch(u):
      run.append(u)
      continue
    if len(run) == 1:
      grams.append(run[0])
    grams += [a + b for a, b in zip(run, run[1:])]
    run = []
    if u:
      grams.append(u)
  return grams


def grounding(answer: str, chunk: str) -> float:
  """Share of the answer's grams (words; CJK character pairs) that occur in the chunk: 1.0
  for an answer copied from the chunk, near 0 for one made up. Numbers are words, so a wrong
  year or count lowers the score."""
  answer_grams = _grams(answer)
  if not answer_grams:
    return 0.0
  chunk_grams = set(_grams(chunk))
  return sum(g in chunk_grams for g in answer_grams) / len(answer_grams)


@dataclasses.dataclass(frozen=True)
class Limits:
  min_question_chars: int = 4
  max_question_chars: int = 300
  min_answer_chars: int = 1
  max_answer_chars: int = 1000
  min_grounding: float = 0.6


def check_pair(item, chunk: str, limits: Limits):
  """({"question", "answer", "grounding"}, None) for a good pair, else (None, reason key)."""
  if not isinstance(item, dict):
    return None, "schema"
  question, answer = _get(item, QUESTION_KEYS), _get(item, ANSWER_KEYS)
  if isinstance(answer, (int, float)) and not isinstance(answer, bool):
    answer = str(answer)  # "answer": 1949
  if not isinstance(question, str) or not isinstance(answer, str):
    return None, "empty" if question in (None, "") or answer in (None, "") else "schema"
  question, answer = question.strip(), answer.strip()
  if not question or not answer:
    return None, "empty"
  if not limits.min_question_chars <= len(question) <= limits.max_question_chars:
    return None, "question_length"
  if not limits.min_answer_chars <= len(answer) <= limits.max_answer_chars:
    return None, "answer_length"
  score = grounding(answer, chunk)
  if score < limits.min_grounding:
    return None, "ungrounded"
  return {"question": question, "answer": answer, "grounding": round(score, 3)}, None


def check_question(text, limits: Limits) -> str | None:
  """A paraphrase (a question alone) or None when it is not a usable question."""
  if not isinstance(text, str):
    return None
  text = text.strip()
  if not limits.min_question_chars <= len(text) <= limits.max_question_chars:
    return None
  return text


def parse_scores(value, count: int) -> list[float] | None:
  """Judge scores: [8, 3] or [{"score": 8}, ...] of exactly `count` numbers in 1..10."""
  if isinstance(value, dict):
    lists = [v for v in value.values() if isinstance(v, list)]
    value = lists[0] if len(lists) == 1 else None
  if not isinstance(value, list) or len(value) != count:
    return None
  scores = []
  for v in value:
    if isinstance(v, dict):
      v = _get(v, ("score", "rating", "分数", "评分"))
    if isinstance(v, str):
      try:
        v = float(v.strip())
      except ValueError:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1 <= v <= 10:
      return None
    scores.append(float(v))
  return scores


def parse_paraphrases(value, count: int) -> list[list] | None:
  """[[q1 variants], [q2 variants], ...] with exactly `count` rows (a row may be a string or
  an object holding a list, which small models sometimes write)."""
  if isinstance(value, dict):
    lists = [v for v in value.values() if isinstance(v, list)]
    value = lists[0] if len(lists) == 1 else None
  if not isinstance(value, list) or len(value) != count:
    return None
  rows = []
  for row in value:
    if isinstance(row, str):
      row = [row]
    elif isinstance(row, dict):
      inner = [v for v in row.values() if isinstance(v, list)]
      row = inner[0] if len(inner) == 1 else []
    rows.append(row if isinstance(row, list) else [])
  return rows
