"""Rouge-1/2/L F1 and smoothed sentence BLEU-4 between generated answers and references.

Tokenisation decides the scores, so it is a named choice reported beside them:
  auto   CJK characters one token each, runs of Latin letters / digits one lowercased word each,
         punctuation and spaces dropped (mixed Chinese/English answers score sensibly)
  char   every non-space character one token (the usual choice for Chinese)
  word   whitespace-separated, lowercased, punctuation stripped from both ends (English)
  jieba  jieba's word segmentation (optional package), lowercased, punctuation dropped
rouge-score's default tokenizer keeps only [a-z0-9] and scores every Chinese answer 0; none of
these do. The definitions follow rouge-score (clipped n-gram overlap, LCS for Rouge-L,
F1 = 2PR / (P + R)) and nltk's `sentence_bleu` with Chen & Cherry's smoothing method 3, the pair
ChatGLM's fine-tuning evaluation uses; tests check both against those packages.
"""

from __future__ import annotations

import collections
import math
import re
import unicodedata
from typing import Sequence

TOKENIZERS = ("auto", "char", "word", "jieba")

# CJK unified ideographs (+ extension A, compatibility), kana, hangul syllables.
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
_AUTO_RE = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+", re.UNICODE)


# What each tokenisation counts as a token, said wherever Rouge/BLEU figures are shown (the eval
# console line, summary.md, eval_<step>.json's "tokenization"): the same answers score very
# differently under char and word.
DESCRIPTIONS = {
    "auto": "one token per CJK character, one per Latin word or number",
    "char": "one token per non-space character",
    "word": "whitespace-separated words",
    "jieba": "jieba's word segmentation",
}


def describe(how: str) -> str:
  """"auto tokenisation: one token per CJK character, ..." for a tokenizer name."""
  return f"{how} tokenisation: {DESCRIPTIONS.get(how, how)}"


def _is_punct(tok: str) -> bool:
  return all(unicodedata.category(c)[0] in "PSZC" for c in tok)


def tokenize(text: str, how: str = "auto") -> list[str]:
  if how == "auto":
    return [t.lower() for t in _AUTO_RE.findall(text)]
  if how == "char":
    return [c for c in text if not c.isspace()]
  if how == "word":
    words = (w.strip("".join(c for c in w if _is_punct(c))).lower() for w in text.split())
    return [w for w in words if w]
  if how == "jieba":
    try:
      import jieba  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ValueError("config.eval.rouge_tokenizer=jieba needs the jieba package: "
                       "pip install jieba==0.42.1 (or use auto / char)") from None
    return [w.lower() for w in jieba.lcut(text) if w.strip() and not _is_punct(w)]
  raise ValueError(f"config.eval.rouge_tokenizer={how!r}; use one of {TOKENIZERS}")


def _ngrams(tokens: Sequence[str], n: int) -> collections.Counter:
  return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _f1(overlap: float, hyp_total: int, ref_total: int) -> dict:
  precision = overlap / hyp_total if hyp_total else 0.0
  recall = overlap / ref_total if ref_total else 0.0
  f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
  return {"precision": precision, "recall": recall, "f1": f}


def rouge_n(hyp: Sequence[str], ref: Sequence[str], n: int) -> dict:
  h, r = _ngrams(hyp, n), _ngrams(ref, n)
  overlap = sum(min(c, r[g]) for g, c in h.items())
  return _f1(overlap, sum(h.values()), sum(r.values()))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
  """Longest common subsequence by dynamic programming, O(len(a) * len(b)) time, O(len(b)) memory."""
  if not a or not b:
    return 0
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def rouge_l(hyp: Sequence[str], ref: Sequence[str]) -> dict:
  return _f1(lcs_length(hyp, ref), len(hyp), len(ref))


def bleu4(hyp: Sequence[str], ref: Sequence[str]) -> float:
  """Sentence BLEU-4 (uniform weights, one reference) with smoothing method 3 of Chen & Cherry
  (2014): the k-th n-gram order without a match gets precision 1 / (2^k * count). As in nltk:
  no unigram match scores 0, an order the hypothesis is too short for counts 0 / 1, and the
  brevity penalty is exp(1 - r / c) for c <= r."""
  if not hyp:
    return 0.0
  precisions = []
  for n in range(1, 5):
    h, r = _ngrams(hyp, n), _ngrams(ref, n)
    precisions.append((sum(min(c, r[g]) for g, c in h.items()), max(1, sum(h.values()))))
  if precisions[0][0] == 0:
    return 0.0
  log_sum, k = 0.0, 1
  for matched, total in precisions:
    if matched == 0:
      p = 1.0 / (2 ** k * total)
      k += 1
    else:
      p = matched / total
    log_sum += 0.25 * math.log(p)
  c, r = len(hyp), len(ref)
  brevity = 1.0 if c > r else math.exp(1 - r / c)
  return brevity * math.exp(log_sum)


def score(hypothesis: str, reference: str, how: str = "auto") -> dict:
  """Rouge-1/2/L F1 and BLEU-4 of one answer against one reference."""
  hyp, ref = tokenize(hypothesis, how), tokenize(reference, how)
  return {"rouge1": rouge_n(hyp, ref, 1)["f1"], "rouge2": rouge_n(hyp, ref, 2)["f1"],
          "rougeL": rouge_l(hyp, ref)["f1"], "bleu4": bleu4(hyp, ref)}


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str], how: str = "auto") -> dict:
  """Means of the per-answer scores (each answer counts once, as rouge-score aggregates)."""
  if len(hypotheses) != len(references):
    raise ValueError(f"{len(hypotheses)} answers for {len(references)} references")
  rows = [score(h, r, how) for h, r in zip(hypotheses, references)]
  keys = ("rouge1", "rouge2", "rougeL", "bleu4")
  out = {k: (sum(row[k] for row in rows) / len(rows) if rows else 0.0) for k in keys}
  out.update(examples=len(rows), tokenizer=how, tokenization=describe(how))
  return out
