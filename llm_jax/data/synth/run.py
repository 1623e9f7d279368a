"""The synthesis run: chunks -> requests (a pool of threads) -> validated records -> ledger.

Per chunk, in a worker thread:
  1. ask for N pairs (qa prompt); an unreadable reply is asked again up to `parse_retries` times
  2. check each pair (schema, lengths, grounding) and drop questions already seen
  3. optionally ask a judge to score the pairs 1-10 and keep those >= threshold
  4. optionally ask for K rephrasings of each kept question (same answer)
The main thread writes each finished chunk's records and ledger line (`ledger.Store`), so the
files have one writer. A chunk is all or nothing: if any of its requests gives up, nothing of
it is written and a rerun asks again.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import queue
import threading
import time

from absl import logging

from llm_jax import workdir_lock
from llm_jax.data.synth import client as client_lib
from llm_jax.data.synth import documents
from llm_jax.data.synth import ledger as ledger_lib
from llm_jax.data.synth import prompts as prompts_lib
from llm_jax.data.synth import validate
from llm_jax.data.synth.summary import Summary

SPLITS = ("none", "document")


@dataclasses.dataclass(frozen=True)
class SynthConfig:
  docs: documents.DocOptions
  chunks: documents.ChunkSpec
  endpoint: client_lib.EndpointConfig
  out: str
  chunk_unit: str = "chars"  # chars | tokens
  tokenizer: str = ""  # with chunk_unit=tokens
  lang: str = "auto"  # auto | zh | en
  pairs_per_chunk: int = 3
  limits: validate.Limits = validate.Limits()
  parse_retries: int = 1
  judge: bool = False
  judge_model: str = ""  # "" = the generating model
  judge_threshold: float = 7.0
  paraphrases: int = 0
  split_by: str = "none"
  val_fraction: float = 0.1
  split_seed: int = 0
  system: str = ""  # system turn opening every written chat; "" = none
  prompt_files: tuple[tuple[str, str], ...] = ()  # (task, path) overrides
  concurrency: int = 4
  retry_failed: bool = False  # also redo chunks the endpoint rejected (400) in earlier runs
  progress_every: float = 10.0  # seconds between progress lines
  fsync: bool = True

  def validate(self) -> "SynthConfig":
    def need(ok, msg):
      if not ok:
        raise ValueError(msg)
    need(self.docs.paths, "--docs is empty; name at least one document file.")
    need(self.out, "--out is empty; name the output JSONL file.")
    need(self.endpoint.model, "--model is empty; name the model the server serves.")
    need(self.chunk_unit in ("chars", "tokens"),
         f"--chunk_unit={self.chunk_unit!r}; use chars or tokens.")
    need(self.chunk_unit == "chars" or self.tokenizer,
         "--chunk_unit=tokens needs --tokenizer (a .model, tokenizer.json, or a run directory).")
    need(self.chunks.budget > 0, f"--chunk_size={self.chunks.budget} must be > 0.")
    need(0 <= self.chunks.overlap < self.chunks.budget,
         f"--chunk_overlap={self.chunks.overlap} must be >= 0 and < "
         f"--chunk_size={self.chunks.budget}.")
    need(self.lang in ("auto", *prompts_lib.LANGS), f"--lang={self.lang!r}; use auto, zh or en.")
    need(1 <= self.pairs_per_chunk <= 50, f"--pairs_per_chunk={self.pairs_per_chunk}; use 1..50.")
    need(0 <= self.limits.min_grounding <= 1,
         f"--min_grounding={self.limits.min_grounding}; use 0..1.")
    need(1 <= self.judge_threshold <= 10, f"--judge_threshold={self.judge_threshold}; use 1..10.")
    need(0 <= self.paraphrases <= 10, f"--paraphrases={self.paraphrases}; use 0..10.")
    need(self.split_by in SPLITS, f"--split_by={self.split_by!r}; use one of {SPLITS}.")
    need(self.split_by == "none" or 0 < self.val_fraction < 1,
         f"--val_fraction={self.val_fraction}; use a value in (0, 1) with --split_by=document.")
    need(self.concurrency >= 1, f"--concurrency={self.concurrency} must be >= 1.")
    need(self.parse_retries >= 0, f"--parse_retries={self.parse_retries} must be >= 0.")
    e = self.endpoint
    need(e.timeout > 0, f"--timeout={e.timeout} must be > 0 seconds.")
    need(e.max_retries >= 0, f"--max_retries={e.max_retries} must be >= 0.")
    need(0 <= e.backoff <= e.max_backoff,
         f"--backoff={e.backoff} must be in [0, --max_backoff={e.max_backoff}].")
    need(e.max_tokens > 0, f"--max_tokens={e.max_tokens} must be > 0.")
    lim = self.limits
    need(0 <= lim.min_question_chars <= lim.max_question_chars,
         "--min_question_chars must be >= 0 and <= --max_question_chars.")
    need(0 < lim.min_answer_chars <= lim.max_answer_chars,
         "--min_answer_chars must be > 0 and <= --max_answer_chars.")
    return self

  def tasks(self) -> tuple[str, ...]:
    """The prompt templates this run uses."""
    return (("qa",) + (("judge",) if self.judge else ()) +
            (("paraphrase",) if self.paraphrases else ()))

  def splits(self) -> tuple[str, ...]:
    return ("all",) if self.split_by == "none" else ("train", "val")

  def settings(self, templates: prompts_lib.Templates) -> dict:
    """What decides which records get written: a rerun must match it to resume. (Concurrency,
    timeouts, retries, max_docs and the document list may change between runs.)"""
    return {
        "model": self.endpoint.model, "lang": self.lang, "prompts": templates.digest(self.tasks()),
        "pairs_per_chunk": self.pairs_per_chunk, "chunk_unit": self.chunk_unit,
        "chunk_size": self.chunks.budget, "chunk_overlap": self.chunks.overlap,
        "sentence_ends": self.chunks.sentence_ends, "clean": self.docs.clean,
        "text_field": self.docs.text_field, "doc_id_field": self.docs.doc_id_field,
        "limits": dataclasses.asdict(self.limits), "judge": self.judge,
        "judge_model": (self.judge_model or self.endpoint.model) if self.judge else "",
        "judge_threshold": self.judge_threshold if self.judge else None,
        "paraphrases": self.paraphrases, "split_by": self.split_by,
        "val_fraction": self.val_fraction if self.split_by != "none" else None,
        "split_seed": self.split_seed if self.split_by != "none" else None,
        "system": self.system,
    }


def split_of(doc_id: str, cfg: SynthConfig) -> str:
  """train/val by a hash of the document id: stable across runs and corpus additions, and a
  document's records (paraphrases included) never straddle the split."""
  if cfg.split_by == "none":
    return "all"
  h = hashlib.sha1(f"{cfg.split_seed}:{doc_id}".encode("utf-8")).digest()
  return "val" if int.from_bytes(h[:8], "big") / 2.0**64 < cfg.val_fraction else "train"


@dataclasses.dataclass
class ChunkResult:
  chunk: documents.Chunk
  records: list[dict] = dataclasses.field(default_factory=list)
  status: str = "ok"  # ok | rejected (400: recorded, not retried) | gave_up (not recorded)
  error: str = ""
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  invalid: collections.Counter = dataclasses.field(default_factory=collections.Counter)


class _Dedup:
  """Normalized questions seen so far, across threads and (loaded from the output) runs."""

  def __init__(self, initial):
    self._seen = set(initial)
    self._lock = threading.Lock()

  def claim(self, question: str) -> bool:
    key = validate.normalize(question)
    with self._lock:
      if key in self._seen:
        return False
      self._seen.add(key)
      return True


class Synthesizer:
  """Turns one chunk into records (runs in worker threads)."""

  def __init__(self, cfg: SynthConfig, endpoint: client_lib.Endpoint,
               judge: client_lib.Endpoint, templates: prompts_lib.Templates, dedup: _Dedup):
    self.cfg, self.endpoint, self.judge_endpoint = cfg, endpoint, judge
    self.templates, self.dedup = templates, dedup

  def _ask_json(self, endpoint, kind: str, prompt: str, result: ChunkResult, parse):
    """The parsed reply of a request, asked again while unreadable; None if it never is."""
    for attempt in range(self.cfg.parse_retries + 1):
      if attempt:
        result.counts[f"resampled_{kind}"] += 1
      reply = endpoint.chat(kind, prompt)
      if reply.finish_reason == "length":
        result.counts["replies_cut_at_max_tokens"] += 1
      value, how = validate.parse_reply(reply.text)
      parsed = parse(value) if value is not None else None
      if parsed is not None:
        if kind == "qa":
          result.counts[f"replies_{how}"] += 1
        return parsed
    if kind == "qa":
      result.counts["replies_unparseable"] += 1
    return None

  def __call__(self, chunk: documents.Chunk) -> ChunkResult:
    result = ChunkResult(chunk)
    try:
      self._run(chunk, result)
    except client_lib.RequestRejected as e:
      result.status, result.error, result.records = "rejected", str(e), []
    except client_lib.RequestGaveUp as e:
      result.status, result.error, result.records = "gave_up", str(e), []
    return result

  def _run(self, chunk: documents.Chunk, result: ChunkResult) -> None:
    cfg = self.cfg
    lang = cfg.lang if cfg.lang != "auto" else prompts_lib.detect_lang(chunk.text)
    prompt = self.templates.qa(lang, chunk.text, cfg.pairs_per_chunk)
    items = self._ask_json(self.endpoint, "qa", prompt, result, validate.as_items)
    if items is None:
      result.invalid["unparseable"] += 1
      return
    result.counts["pairs_proposed"] += len(items)
    pairs, local = [], set()
    for item in items:
      pair, reason = validate.check_pair(item, chunk.text, cfg.limits)
      if pair is not None:
        key = validate.normalize(pair["question"])
        if key in local:
          reason = "duplicate"
        local.add(key)
      if reason:
        result.invalid[reason] += 1
      else:
        pairs.append(pair)

    if cfg.judge and pairs:
      shown = [{"question": p["question"], "answer": p["answer"]} for p in pairs]
      prompt = self.templates.judge(lang, chunk.text, shown)
      scores = self._ask_json(self.judge_endpoint, "judge", prompt, result,
                              lambda v: validate.parse_scores(v, len(pairs)))
      if scores is None:
        result.invalid["judge_unreadable"] += len(pairs)
        pairs = []
      else:
        for p, s in zip(pairs, scores):
          p["judge_score"] = s
        result.invalid["judge_low"] += sum(s < cfg.judge_threshold for s in scores)
        pairs = [p for p in pairs if p["judge_score"] >= cfg.judge_threshold]

    # Claimed only now, so a question the judge dropped may still come from another chunk.
    kept = []
    for p in pairs:
      if self.dedup.claim(p["question"]):
        kept.append(p)
      else:
        result.invalid["duplicate"] += 1
    result.counts["pairs_kept"] += len(kept)
    variants = (self._paraphrase(lang, kept, result) if cfg.paraphrases and kept else
                [[] for _ in kept])
    for p, extra in zip(kept, variants):
      result.records.append(self._record(chunk, p["question"], p, None))
      for q in extra:
        result.records.append(self._record(chunk, q, p, p["question"]))

  def _paraphrase(self, lang: str, pairs: list[dict], result: ChunkResult) -> list[list[str]]:
    questions = [p["question"] for p in pairs]
    rows = self._ask_json(self.endpoint, "paraphrase",
                          self.templates.paraphrase(lang, questions, self.cfg.paraphrases), result,
                          lambda v: validate.parse_paraphrases(v, len(questions)))
    if rows is None:
      result.counts["paraphrase_replies_unreadable"] += 1
      return [[] for _ in pairs]
    out = []
    for row in rows:
      kept = []
      for text in row[:self.cfg.paraphrases]:
        q = validate.check_question(text, self.cfg.limits)
        if q is None:
          result.counts["paraphrases_invalid"] += 1
        elif not self.dedup.claim(q):  # also catches a copy of the original question
          result.counts["paraphrases_duplicate"] += 1
        else:
          kept.append(q)
      result.counts["paraphrases_kept"] += len(kept)
      result.counts["paraphrases_missing"] += max(0, self.cfg.paraphrases - len(row))
      out.append(kept)
    return out

  def _record(self, chunk: documents.Chunk, question: str, pair: dict, paraphrase_of):
    messages = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
    messages += [{"role": "user", "content": question},
                 {"role": "assistant", "content": pair["answer"]}]
    meta = {"doc_id": chunk.doc_id, "chunk_id": chunk.chunk_id, "grounding": pair["grounding"]}
    if "judge_score" in pair:
      meta["judge_score"] = pair["judge_score"]
    if paraphrase_of is not None:
      meta["paraphrase_of"] = paraphrase_of
    return {"messages": messages, "metadata": meta}


class _Pool:
  """Daemon worker threads: a Ctrl-C in the main thread is never held up by a request in
  flight (its answer is simply lost, as promised)."""

  def __init__(self, n: int, fn):
    self.jobs: queue.Queue = queue.Queue()
    self.results: queue.Queue = queue.Queue()
    self._n = n
    for _ in range(n):
      threading.Thread(target=self._work, args=(fn,), daemon=True).start()

  def _work(self, fn):
    while (job := self.jobs.get()) is not None:
      try:
        self.results.put(fn(job))
      except BaseException as e:  # pylint: disable=broad-except  # the main thread re-raises
        self.results.put(e)

  def stop(self) -> None:
    """Drops the queued chunks (never sent) and lets each thread end after its request."""
    try:
      while True:
        self.jobs.get_nowait()
    except queue.Empty:
      pass
    for _ in range(self._n):
      self.jobs.put(None)


def _count_chunks(cfg: SynthConfig, size, summary: Summary) -> list[tuple[str, str]]:
  """Reads every document once before any request: a bad record stops the run now, not
  hours in. Returns (chunk id, sha) of all chunks (the texts are re-read when sent)."""
  def skipped(msg):
    summary.skipped_records += 1
    if summary.skipped_records & (summary.skipped_records - 1) == 0:
      logging.warning("synth: skipped a bad record (%d so far): %s", summary.skipped_records, msg)
  ids, docs = [], set()
  for chunk in documents.iter_chunks(cfg.docs, cfg.chunks, size, on_skip=skipped):
    ids.append((chunk.chunk_id, chunk.sha))
    docs.add(chunk.doc_id)
  summary.documents = len(docs)
  return ids


def _endpoints(cfg: SynthConfig, sleep) -> tuple[client_lib.Endpoint, client_lib.Endpoint]:
  """(generator, judge); both checked before any work. The judge samples greedily (the same
  pairs get the same scores) and keeps its own counters."""
  endpoint = client_lib.Endpoint(cfg.endpoint, sleep=sleep)
  endpoint.check_model()
  if not cfg.judge:
    return endpoint, endpoint
  judge = client_lib.Endpoint(dataclasses.replace(
      cfg.endpoint, model=cfg.judge_model or cfg.endpoint.model, temperature=0.0, top_p=1.0),
                              sleep=sleep)
  if judge.cfg.model != cfg.endpoint.model:
    judge.check_model()
  return endpoint, judge


def run(cfg: SynthConfig, *, sleep=time.sleep) -> Summary:
  """Generates and writes the records; returns the summary, also when interrupted (Ctrl-C,
  SIGTERM: `interrupted`) or stopped by the endpoint (bad key, server gone: `stopped`). User
  errors raise before the first request; a run already writing the same --out raises
  workdir_lock.Busy before anything is read or written."""
  cfg.validate()
  with workdir_lock.hold_file(ledger_lib.lock_path(cfg.out), cfg.out, hint="use another --out"):
    return _run(cfg, sleep)


def _run(cfg: SynthConfig, sleep) -> Summary:
  start = time.time()
  templates = prompts_lib.Templates.load(dict(cfg.prompt_files))
  size = documents.token_counter(cfg.tokenizer) if cfg.chunk_unit == "tokens" else len
  summary = Summary(out={})
  all_chunks = _count_chunks(cfg, size, summary)
  summary.chunks_total = len(all_chunks)
  if not all_chunks:
    raise ValueError(f"--docs={','.join(cfg.docs.paths)}: no text to make chunks from.")
  endpoint, judge = _endpoints(cfg, sleep)
  store = ledger_lib.Store(cfg.out, cfg.splits(), cfg.settings(templates), fsync=cfg.fsync)
  summary.out, summary.dropped_bytes = dict(store.outputs), store.dropped_bytes
  if store.dropped_bytes:
    logging.warning("synth: cut %d bytes of uncommitted output left by an interrupted run.",
                    store.dropped_bytes)

  def pending(chunk_id: str, sha: str) -> bool:
    if store.done.get(chunk_id) is None:
      return True
    if store.done[chunk_id] != sha:
      return True  # the document was edited: its new text is asked for (old records stay)
    return cfg.retry_failed and chunk_id in store.failed

  changed = sum(1 for cid, sha in all_chunks if store.done.get(cid, sha) != sha)
  if changed:
    summary.counts["chunks_changed_since_last_run"] = changed
    logging.warning("synth: %d chunks changed since the last run (documents edited); they are "
                    "asked again and their old records stay in the output.", changed)
  summary.chunks_before = sum(1 for cid, sha in all_chunks if not pending(cid, sha))
  remaining = summary.chunks_total - summary.chunks_before
  logging.info("synth: %d documents, %d chunks (%d finished in earlier runs, %d to do) -> %s",
               summary.documents, summary.chunks_total, summary.chunks_before, remaining,
               ", ".join(store.outputs.values()))
  todo = (c for c in documents.iter_chunks(cfg.docs, cfg.chunks, size)
          if pending(c.chunk_id, c.sha))
  synth = Synthesizer(cfg, endpoint, judge, templates, _Dedup(store.load_questions()))

  gave_up_in_a_row = 0
  # A server that went away fails every chunk after minutes of retries each: stop instead.
  max_gave_up_in_a_row = max(4, 2 * cfg.concurrency)

  def commit(result: ChunkResult) -> None:
    nonlocal gave_up_in_a_row
    summary.counts.update(+result.counts)  # unary + drops zero counts
    summary.invalid.update(+result.invalid)
    chunk = result.chunk
    if result.status != "ok":
      summary.add_error(f"{chunk.chunk_id} ({chunk.where}): {result.status}: {result.error}")
    gave_up_in_a_row = gave_up_in_a_row + 1 if result.status == "gave_up" else 0
    if result.status == "gave_up":  # not on the ledger: a rerun asks again
      summary.chunks_gave_up += 1
      if gave_up_in_a_row >= max_gave_up_in_a_row:
        raise client_lib.EndpointError(
            f"{gave_up_in_a_row} chunks in a row failed after all retries (last: {result.error}); "
            f"is {cfg.endpoint.base_url} up? Rerun the same command to continue.")
      return
    summary.chunks_rejected += result.status == "rejected"
    store.commit(chunk.chunk_id, chunk.sha, {split_of(chunk.doc_id, cfg): result.records},
                 result.status)
    summary.chunks_done += 1
    summary.records_written += len(result.records)

  pool = _Pool(cfg.concurrency, synth)
  try:
    _drive(pool, todo, commit, cfg.concurrency,
           lambda: _log_progress(summary, remaining, start), cfg.progress_every)
  except KeyboardInterrupt:
    summary.interrupted = True
  except client_lib.EndpointError as e:  # raised by a worker (401...) or by commit above
    summary.stopped = str(e)
  finally:
    pool.stop()
    summary.add_endpoint_counters([endpoint] if judge is endpoint else [endpoint, judge])
    summary.records_in_files = dict(store.records)
    summary.seconds = round(time.time() - start, 2)
    store.close()
    summary.save(store.summary_path)
  return summary


def _drive(pool: _Pool, todo, commit, concurrency: int, log, log_every: float) -> None:
  """Feeds chunks to the pool, at most 2 x concurrency queued or in flight (bounded memory,
  workers never idle), and commits each result in this thread as it arrives."""
  in_flight, last_log = 0, time.time()

  def take_one() -> None:
    nonlocal in_flight, last_log
    while True:
      if time.time() - last_log >= log_every:
        last_log = time.time()
        log()
      try:
        result = pool.results.get(timeout=0.5)  # a timeout keeps Ctrl-C responsive
        break
      except queue.Empty:
        continue
    in_flight -= 1
    if isinstance(result, BaseException):  # EndpointError (bad key...) from a worker
      raise result
    commit(result)

  for chunk in todo:
    while in_flight >= 2 * concurrency:
      take_one()
    pool.jobs.put(chunk)
    in_flight += 1
  while in_flight:
    take_one()


def _log_progress(summary: Summary, remaining: int, start: float) -> None:
  done = summary.chunks_done + summary.chunks_gave_up
  rate = done / max(time.time() - start, 1e-9)
  eta = (remaining - done) / rate if rate > 0 else float("inf")
  logging.info("synth: %d/%d chunks, %d records written, %.2f chunks/s, about %s left",
               done, remaining, summary.records_written, rate,
               f"{eta:.0f} s" if eta != float("inf") else "?")
