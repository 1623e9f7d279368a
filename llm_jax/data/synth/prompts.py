"""Prompt templates: plain-text files with {placeholders}, one per task and language.

The defaults live in prompts/<task>_<lang>.txt beside this file. A user replaces one with
--qa_prompt=FILE (used for every language) or --qa_prompt=my_qa_{lang}.txt (one file per
language). Placeholders are filled in a single pass, so braces elsewhere in a template (a JSON
example) or in the document text are left alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

LANGS = ("zh", "en")
TASKS = {  # task -> placeholders its template must contain
    "qa": ("{chunk}", "{n}"),
    "paraphrase": ("{questions}", "{k}"),
    "judge": ("{chunk}", "{pairs}"),
}
_DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
_PLACEHOLDER = re.compile(r"\{(n|k|count|chunk|questions|pairs)\}")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")


def detect_lang(text: str) -> str:
  """zh when CJK characters are at least a fifth of the letters (CJK + Latin), else en.
  (A Chinese sentence of 20 characters carries ~3 Latin words at most in wiki text.)"""
  cjk = len(_CJK.findall(text))
  latin = len(_LATIN.findall(text))
  return "zh" if cjk and cjk * 5 >= cjk + latin else "en"


def fill(template: str, **values) -> str:
  return _PLACEHOLDER.sub(lambda m: str(values[m[1]]) if m[1] in values else m[0], template)


@dataclasses.dataclass
class Templates:
  """The template text of each (task, lang), read and checked once at start-up."""
  texts: dict[tuple[str, str], str]

  @classmethod
  def load(cls, overrides: dict[str, str], langs=LANGS) -> "Templates":
    texts = {}
    for task, required in TASKS.items():
      for lang in langs:
        given = overrides.get(task, "")
        path = (given.replace("{lang}", lang) if given else
                os.path.join(_DEFAULT_DIR, f"{task}_{lang}.txt"))
        flag = f"--{task}_prompt"
        if not os.path.isfile(path):
          raise FileNotFoundError(f"{flag}: the template {path!r} does not exist.")
        with open(path, encoding="utf-8") as f:
          text = f.read()
        missing = [p for p in required if p not in text]
        if missing:
          raise ValueError(f"{flag}: the template {path} lacks the placeholder(s) "
                           f"{', '.join(missing)}; a {task} template needs {', '.join(required)}.")
        texts[(task, lang)] = text
    return cls(texts)

  def digest(self, tasks=tuple(TASKS)) -> str:
    """Fingerprint of the templates of `tasks` (the ledger refuses to resume with other
    prompts)."""
    h = hashlib.sha1()
    for key in sorted(k for k in self.texts if k[0] in tasks):
      h.update(json.dumps([*key, self.texts[key]], ensure_ascii=False).encode())
    return h.hexdigest()[:16]

  def qa(self, lang: str, chunk: str, n: int) -> str:
    return fill(self.texts[("qa", lang)], chunk=chunk, n=n)

  def paraphrase(self, lang: str, questions: list[str], k: int) -> str:
    return fill(self.texts[("paraphrase", lang)], k=k, count=len(questions),
                questions=json.dumps(questions, ensure_ascii=False, indent=1))

  def judge(self, lang: str, chunk: str, pairs: list[dict]) -> str:
    return fill(self.texts[("judge", lang)], chunk=chunk, count=len(pairs),
                pairs=json.dumps(pairs, ensure_ascii=False, indent=1))
