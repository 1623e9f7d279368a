"""The eval tasks: each reads and checks its data once (before any checkpoint is loaded, so a bad
file fails at once), then `run(runner)` scores one checkpoint and returns (metrics, samples).
The numbers come from the metric modules (train/evaluate, rouge, repetition, knowledge, choice); this
file only connects data, model and metrics.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from absl import logging

from llm_jax import rundir, sharding
from llm_jax.data import builtin, chat_template, formats, pipeline, sources
from llm_jax.data.builtin import bios
from llm_jax.eval import choice as choice_lib
from llm_jax.eval import knowledge as knowledge_lib
from llm_jax.eval import repetition as rep_lib
from llm_jax.eval import rouge as rouge_lib
from llm_jax.eval.model_io import ModelRunner
from llm_jax.console import Progress
from llm_jax.infer.sampling import SamplingConfig
from llm_jax.infer.session import end_of_turn_ids, prompt_ids, read_prompts
from llm_jax.infer.text import whole_character_prefix
from llm_jax.train import evaluate

TASKS = ("loss", "rouge", "repetition", "knowledge", "choice")
BUILTIN_CHAT_PROMPTS = ("李白是谁？", "介绍一下你自己。", "请写一首关于春天的诗。",
                        "What is the capital of France?", "Tell me a story about a cat.")
_SAMPLES_PER_KIND = 32  # generated texts kept per task and checkpoint for reading


@dataclasses.dataclass
class Context:
  cfg: object  # the merged config (run_config.resolve)
  workdir: str
  tok: object
  model_cfg: object
  mesh: object
  rules: tuple
  param_shardings: object
  context: int = 0  # the run's context (rundir.context_length): prompt + answer fit in it


def _limit(items: list, n: int) -> list:
  return items[:n] if n else items


def _greedy(max_new: int) -> SamplingConfig:
  return SamplingConfig(temperature=0.0, max_new_tokens=max_new)


class Loss:
  """Loss, perplexity and token accuracy on data.eval (token-weighted and per document)."""

  def __init__(self, ctx: Context):
    self.ctx = ctx
    if not ctx.cfg.data.eval:
      raise ValueError(f"nothing to evaluate: the run in {ctx.workdir} has no eval data; set "
                       "config.data.eval to a source (a file path or builtin:...)")
    pipeline.parse_spec(ctx.cfg.data.eval, "config.data.eval")
    self.evaluator = evaluate.Evaluator(ctx.model_cfg, ctx.param_shardings, ctx.mesh, ctx.rules,
                                        per_document=True)

  def run(self, runner: ModelRunner):
    c = self.ctx
    batches = pipeline.make_eval_iterator(c.cfg.data, c.tok, process_index=jax.process_index(),
                                          process_count=jax.process_count())
    batches = _counted(batches, c.cfg.eval.max_batches)
    with sharding.mesh_context(c.mesh, c.rules):
      res = self.evaluator(runner.params, {}, batches, c.cfg.eval.max_batches)
    res.update(data=c.cfg.data.eval, packing=c.cfg.data.packing, seq_len=c.cfg.data.seq_len,
               batch_size=c.cfg.data.batch_size)
    return res, []


def _counted(batches, max_batches: int):
  """The eval batches with progress: a bar when their number is known, else a line per 20 (the
  final count is the task's own line, from the same figure the JSON holds)."""
  bar = Progress(max_batches, "loss") if max_batches else None
  for n, batch in enumerate(batches, 1):
    yield batch
    if bar:
      bar.update(1)
    elif n % 20 == 0:
      logging.info("loss: %d batches so far", n)


def _raw_records(spec: str, data_cfg, field: str):
  """(record, where) of every source in a spec, unnormalised (built-ins as generated)."""
  for s in pipeline.parse_spec(spec, field):
    if builtin.is_builtin(s.path):
      src = sources.ListSource(s.path, builtin.records(s.path, data_cfg.synthetic, field))
    else:
      src = sources.open_path(s.path, data_cfg.tfds_data_dir)
    for i in range(len(src)):
      yield src[i], src.where(i)


def read_references(spec: str, data_cfg, limit: int = 0) -> tuple[list[dict], int]:
  """Rouge references: ({"messages": prompt, "reference", "where"} records, empty ones skipped).
  A record is {"prompt": str or messages, "reference": str}, any chat / Alpaca / ShareGPT
  record whose last assistant turn is the reference and whose earlier turns are the prompt, or a
  preference pair (its chosen response is the reference)."""
  out, skipped, fmt = [], 0, None
  for rec, where in _raw_records(spec, data_cfg, "config.eval.references"):
    if isinstance(rec, dict) and "reference" in rec:
      prompt, reference = rec.get("prompt"), rec["reference"]
      if isinstance(prompt, str) and prompt.strip():
        messages = [{"role": "user", "content": prompt}]
      elif isinstance(prompt, list) and prompt:
        messages = formats.normalize({"messages": prompt}, "chat", "text", where)["messages"]
      else:
        raise ValueError(f"{where}: field 'prompt' must be a non-empty string or a list of "
                         "messages")
      if not isinstance(reference, str):
        raise ValueError(f"{where}: field 'reference' must be a string")
    elif isinstance(rec, dict) and "chosen" in rec and "rejected" in rec:
      # A preference pair (DPO data): the preferred response is the reference.
      pair = formats.normalize_pair(rec, where)
      answers = [m["content"] for m in pair["chosen"] if m["role"] == "assistant"]
      messages, reference = pair["prompt"], answers[-1]
    else:
      fmt = fmt or formats.detect_format(rec, data_cfg.text_field, where)
      doc = formats.normalize(rec, fmt, data_cfg.text_field, where)
      if "messages" not in doc:
        raise ValueError(f"{where}: rouge needs chats or {{\"prompt\", \"reference\"}} records; "
                         "this is plain text (set config.eval.references)")
      turns = doc["messages"]
      last = max((k for k, m in enumerate(turns) if m["role"] == "assistant"), default=None)
      if last is None or last == 0:
        raise ValueError(f"{where}: the chat has no assistant turn after a prompt to use as the "
                         "reference")
      messages, reference = turns[:last], turns[last]["content"]
    if not reference.strip():
      skipped += 1
      logging.warning("rouge: %s has an empty reference; skipped (%d so far)", where, skipped)
      continue
    out.append({"messages": messages, "reference": reference, "where": where})
    if limit and len(out) >= limit:
      break
  if not out:
    raise ValueError(f"config.eval.references={spec!r}: no usable reference ({skipped} empty)")
  return out, skipped


class Rouge:
  """Greedy answers to a reference set, scored with Rouge-1/2/L F1 and BLEU-4."""

  def __init__(self, ctx: Context):
    self.ctx = ctx
    e = ctx.cfg.eval
    rouge_lib.tokenize("", e.rouge_tokenizer)  # a bad tokenizer name fails now
    spec = e.references or ctx.cfg.data.eval
    if not spec:
      raise ValueError("rouge: set config.eval.references (or config.data.eval) to a reference set")
    self.spec = spec
    self.records, self.skipped = read_references(spec, ctx.cfg.data, e.max_examples)
    self.prompts = [prompt_ids(ctx.tok, r["messages"]) for r in self.records]

  def run(self, runner: ModelRunner):
    c = self.ctx
    gens = runner.generate(self.prompts, _greedy(c.cfg.eval.max_new_tokens),
                           stop_token_ids=end_of_turn_ids(c.tok), decode_fn=c.tok.decode,
                           desc="rouge")
    hyps = [g.text for g in gens]
    refs = [r["reference"] for r in self.records]
    res = rouge_lib.corpus_scores(hyps, refs, c.cfg.eval.rouge_tokenizer)
    res.update(skipped_empty_reference=self.skipped, references=self.spec)
    samples = [{"where": r["where"], "prompt": r["messages"][-1]["content"], "reference": ref,
                "answer": h, **rouge_lib.score(h, ref, c.cfg.eval.rouge_tokenizer)}
               for r, ref, h in zip(self.records, refs, hyps)]
    return res, samples


def chat_prompt_records(spec: str, synthetic_cfg) -> list[dict]:
  if not spec:
    return []
  if spec == "builtin":
    records = [{"prompt": p} for p in BUILTIN_CHAT_PROMPTS]
    data = bios.generate(synthetic_cfg)
    person = data["people"][data["heldout"][0] if data["heldout"] else 0]
    for lang in [s.strip() for s in synthetic_cfg.languages.split(",") if s.strip()]:
      q = bios.QUESTIONS[lang]["university"][0]
      records.append({"prompt": q.format(name=person["name"][lang])})
    return records
  return read_prompts(spec)


class Repetition:
  """Welleck et al.'s repetition metrics on held-out data, plus fixed chat prompts.

  Text documents: a rep_prefix-token prefix, continued for rep_continuation tokens. Chats: the
  prompt before the last assistant turn, answered (up to rep_continuation tokens). Both greedy and
  sampled. rep/l is teacher-forced on the same documents (on assistant tokens for chats).
  """

  def __init__(self, ctx: Context):
    self.ctx = ctx
    e, data = ctx.cfg.eval, ctx.cfg.data
    self.windows = [int(w) for w in str(e.rep_windows).split(",") if w.strip()]
    if not data.eval:
      raise ValueError("repetition: set config.data.eval to held-out data")
    tok = ctx.tok
    self.prompts, self.rows, self.mode, self.shown = [], [], None, []
    readers = [pipeline.DocReader(s.path, data)
               for s in pipeline.parse_spec(data.eval, "config.data.eval")]
    for reader in readers:
      for i in range(len(reader)):
        if e.max_examples and len(self.prompts) >= e.max_examples:
          break
        doc = reader[i]
        if "error" in doc:
          continue
        if "messages" in doc:
          turns = doc["messages"]
          last = max((k for k, m in enumerate(turns) if m["role"] == "assistant"), default=0)
          if last == 0:
            continue
          ids, w = chat_template.encode_chat(tok, turns[:last + 1], where=doc["where"])
          self.prompts.append(prompt_ids(tok, turns[:last]))
          self.shown.append(turns[last - 1]["content"])
          self.mode = self.mode or "chat answers"
        else:
          ids = np.asarray(tok.encode(doc["text"]) + [tok.eos_id], np.int32)
          w = np.ones(len(ids), np.float32)
          if len(ids) <= e.rep_prefix:
            continue
          # cut at a character boundary: a split character would show as U+FFFD in the samples
          # and start the continuation on half a character
          cut = whole_character_prefix(tok.decode, ids.tolist(), e.rep_prefix)
          self.prompts.append(ids[:cut].tolist())
          self.shown.append(tok.decode(self.prompts[-1]))
          self.mode = self.mode or "text continuations"
        n = data.seq_len + 1
        self.rows.append((ids[:n].tolist(), w[:n].tolist()))
    if not self.prompts:
      raise ValueError(f"repetition: config.data.eval={data.eval!r} has no chat with an answer "
                       f"and no text longer than rep_prefix={e.rep_prefix} tokens")
    self.chat_records = chat_prompt_records(e.chat_prompts, data.synthetic)
    self.chat_prompts = [prompt_ids(tok, r.get("messages") or [{"role": "user",
                                                                "content": r["prompt"]}])
                         for r in self.chat_records]

  def run(self, runner: ModelRunner):
    c, e = self.ctx, self.ctx.cfg.eval
    stops = end_of_turn_ids(c.tok) if self.mode == "chat answers" else [c.tok.eos_id]
    n_new = e.rep_continuation
    sampled_cfgs = [SamplingConfig(temperature=e.sample_temperature, top_p=e.sample_top_p,
                                   max_new_tokens=n_new, seed=c.cfg.seed + i)
                    for i in range(len(self.prompts))]
    res = {"mode": self.mode, "prompts": len(self.prompts)}
    samples = []
    for kind, sampling in (("greedy", _greedy(n_new)), ("sampled", sampled_cfgs)):
      gens = runner.generate(self.prompts, sampling, stop_token_ids=stops, desc=f"repetition {kind}")
      toks = [g.tokens for g in gens]
      res[kind] = rep_lib.continuation_metrics(
          toks, [g.finish_reason == "stop" for g in gens], n=e.rep_n, loop_window=e.loop_window)
      samples += [{"kind": kind, "prompt": shown,
                   "continuation": c.tok.decode(  # no half character where the limit cut one
                       g.tokens[:whole_character_prefix(c.tok.decode, g.tokens, len(g.tokens))]),
                   "finish_reason": g.finish_reason,
                   f"seq_rep_{e.rep_n}": rep_lib.seq_rep_n(g.tokens, e.rep_n)}
                  for shown, g in list(zip(self.shown, gens))[:_SAMPLES_PER_KIND]]
    counts: dict = {}
    for (ids, w), s in zip(self.rows, runner.score(self.rows, desc="repetition rep/l")):
      row = rep_lib.rep_l(s.argmax[None], np.asarray(ids[:-1])[None], np.asarray(ids[1:])[None],
                          np.asarray(w[1:])[None], self.windows)
      for k, v in row.items():
        counts[k] = counts.get(k, 0) + v
    res.update(rep_lib.finish_rep_l(counts, self.windows))
    if self.chat_prompts:
      gens = runner.generate(self.chat_prompts, _greedy(n_new), stop_token_ids=end_of_turn_ids(c.tok),
                             decode_fn=c.tok.decode, desc="chat prompts")
      res["chat_prompts"] = rep_lib.continuation_metrics(
          [g.tokens for g in gens], [g.finish_reason == "stop" for g in gens], n=e.rep_n,
          loop_window=e.loop_window)
      samples += [{"kind": "chat_prompt", "prompt": r.get("prompt") or r["messages"][-1]["content"],
                   "answer": g.text, "finish_reason": g.finish_reason,
                   f"seq_rep_{e.rep_n}": rep_lib.seq_rep_n(g.tokens, e.rep_n)}
                  for r, g in zip(self.chat_records, gens)]
    return res, samples


class Knowledge:
  """Greedy answers to knowledge probes: the encyclopedia's people, or config.eval.probe."""

  def __init__(self, ctx: Context):
    self.ctx = ctx
    e = ctx.cfg.eval
    if e.probe:
      self.probes = knowledge_lib.read_probe_file(e.probe)
    else:
      self.probes = knowledge_lib.encyclopedia_probes(ctx.cfg.data.synthetic, e.knowledge_people)
    self.prompts = [prompt_ids(ctx.tok, p.messages) for p in self.probes]

  def run(self, runner: ModelRunner):
    c = self.ctx
    gens = runner.generate(self.prompts, _greedy(c.cfg.eval.max_new_tokens),
                           stop_token_ids=end_of_turn_ids(c.tok), decode_fn=c.tok.decode,
                           desc="knowledge")
    answers = [g.text for g in gens]
    res = knowledge_lib.summarize(self.probes, answers)
    res["source"] = c.cfg.eval.probe or "builtin encyclopedia"
    res["training_lineage"] = rundir.training_lineage(c.workdir)
    samples = []
    for p, a in zip(self.probes, answers):
      exact, contains = knowledge_lib.judge(a, p)
      samples.append({"question": p.messages[-1]["content"], "reference": p.reference,
                      "answer": a, "exact": exact, "contains": contains, **p.tags})
    return res, samples


class Choice:
  """Multiple-choice accuracy by per-choice log-likelihood (see choice.py)."""

  def __init__(self, ctx: Context):
    self.ctx = ctx
    e = ctx.cfg.eval
    if e.choice_shots < 0:
      raise ValueError(f"config.eval.choice_shots={e.choice_shots}: must be >= 0")
    questions = choice_lib.read_questions(e.choice_file, ctx.cfg.data.synthetic)
    dev = choice_lib.read_questions(e.choice_dev, ctx.cfg.data.synthetic) if e.choice_dev else []
    self.questions = _limit(questions, e.max_examples)
    self.style = choice_lib.resolve_style(e.choice_style, self.questions)
    self.fmt = e.choice_format
    self.rows, self.owner = [], []
    for i, q in enumerate(self.questions):
      ctx_text = choice_lib.context(q, choice_lib.shots_for(i, questions, dev, e.choice_shots),
                                    self.style, self.fmt)
      for cont in choice_lib.continuations(q, self.fmt):
        ctx_ids, cont_ids = choice_lib.encode_pair(ctx.tok, ctx_text, cont)
        if not cont_ids:
          raise ValueError(f"{q.where}: choice {cont!r} encodes to no tokens after the prompt")
        ctx_ids = ctx_ids or [ctx.tok.eos_id]  # lm-eval's prefix token for an empty context
        self.rows.append((ctx_ids + cont_ids, [0.0] * len(ctx_ids) + [1.0] * len(cont_ids)))
        self.owner.append(i)
    self.max_len = ctx.context or ctx.cfg.data.seq_len
    self.truncated = sum(len(ids) - 1 > self.max_len for ids, _ in self.rows)

  def run(self, runner: ModelRunner):
    scored = runner.score(self.rows, max_len=self.max_len, desc="choice")
    logliks = [[] for _ in self.questions]
    for i, s in zip(self.owner, scored):
      logliks[i].append(s.logprob)
    e = self.ctx.cfg.eval
    res = choice_lib.accuracy(logliks, self.questions, self.fmt)
    res.update(file=e.choice_file, shots=e.choice_shots, style=self.style, format=self.fmt,
               truncated_rows=self.truncated)
    samples = [{"where": q.where, "question": q.question, "answer": "ABCDEFGHIJ"[q.answer],
                "predicted": "ABCDEFGHIJ"[int(np.argmax(ll))], "logliks": ll}
               for q, ll in zip(self.questions, logliks)]
    return res, samples


REGISTRY = {"loss": Loss, "rouge": Rouge, "repetition": Repetition, "knowledge": Knowledge,
            "choice": Choice}


def parse_tasks(spec: str) -> list[str]:
  names = [t.strip() for t in spec.split(",") if t.strip()]
  bad = [t for t in names if t not in REGISTRY]
  if bad or not names:
    raise ValueError(f"config.eval.tasks={spec!r}: unknown task(s) {bad}; use a comma list of "
                     f"{', '.join(TASKS)}")
  return list(dict.fromkeys(names))
