"""What a run did, printed for the user and saved as <out stem>.summary.json for scripts."""

from __future__ import annotations

import collections
import dataclasses
import json
import os

from llm_jax.data.synth import validate

_MAX_ERRORS = 20  # failed chunks kept by name (the counts are complete)


@dataclasses.dataclass
class Summary:
  out: dict  # split -> output path
  chunks_total: int = 0  # chunks of all documents
  chunks_before: int = 0  # finished in earlier runs (skipped now)
  chunks_done: int = 0  # finished now (rejected ones included)
  chunks_rejected: int = 0  # the endpoint refused the request (400): recorded, not retried
  chunks_gave_up: int = 0  # transient errors outlasted the retries: not recorded, a rerun retries
  documents: int = 0
  records_written: int = 0  # records written now (pairs + paraphrases)
  records_in_files: dict = dataclasses.field(default_factory=dict)  # split -> records
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  invalid: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  requests: dict = dataclasses.field(default_factory=dict)  # kind -> HTTP requests (retries too)
  retries: dict = dataclasses.field(default_factory=dict)  # reason -> retries
  retry_wait_s: dict = dataclasses.field(default_factory=dict)  # reason -> seconds waited
  tokens: dict = dataclasses.field(default_factory=dict)  # prompt / completion (server's usage)
  skipped_records: int = 0  # bad document records skipped (--skip_bad_records)
  dropped_bytes: int = 0  # uncommitted output of an interrupted run, cut off at start
  errors: list = dataclasses.field(default_factory=list)
  interrupted: bool = False
  stopped: str = ""  # why the endpoint made the run stop early ("" = it did not)
  seconds: float = 0.0

  def add_error(self, text: str) -> None:
    if len(self.errors) < _MAX_ERRORS:
      self.errors.append(text)

  def add_endpoint_counters(self, endpoints) -> None:
    for name in ("requests", "retries", "tokens"):
      total = collections.Counter()
      for e in endpoints:
        total.update(getattr(e, name))
      setattr(self, name, dict(total))
    waited = collections.Counter()
    for e in endpoints:
      waited.update(e.waited)
    self.retry_wait_s = {k: round(v, 3) for k, v in waited.items()}

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["counts"], d["invalid"] = dict(self.counts), dict(self.invalid)
    return d

  def save(self, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(self.to_json(), f, ensure_ascii=False, indent=1)
    os.replace(tmp, path)

  def format(self) -> str:
    c = self.counts
    state = ("interrupted (rerun the same command to continue)" if self.interrupted else
             "stopped early (see the error below)" if self.stopped else "finished")
    lines = [f"synth: {state} in {self.seconds:.1f} s -> {', '.join(self.out.values())}"]
    chunk_line = (f"{self.documents:,} documents, {self.chunks_total:,} chunks: "
                  f"{self.chunks_done:,} done now, {self.chunks_before:,} in earlier runs")
    left = self.chunks_total - self.chunks_done - self.chunks_before
    if left:
      chunk_line += f", {left:,} not done"
    lines.append(f"  chunks     {chunk_line}")
    if self.chunks_rejected or self.chunks_gave_up:
      lines.append(f"  failed     {self.chunks_rejected} rejected by the endpoint (not retried; "
                   f"--retry_failed asks again), {self.chunks_gave_up} gave up after the retries "
                   "(a rerun asks again)")
    n_requests = sum(self.requests.values())
    kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(self.requests.items()))
    resampled = sum(v for k, v in c.items() if k.startswith("resampled_"))
    lines.append(f"  requests   {n_requests:,}" + (f" ({kinds})" if kinds else "") +
                 (f"; {resampled} asked again after an unreadable reply" if resampled else ""))
    n_retries = sum(self.retries.values())
    detail = ", ".join(f"{k} x{v} (waited {self.retry_wait_s.get(k, 0):.1f} s)"
                       for k, v in sorted(self.retries.items()))
    lines.append(f"  retries    {n_retries}" + (f": {detail}" if detail else ""))
    lines.append(f"  replies    JSON {c['replies_json']}, fenced {c['replies_fenced']}, repaired "
                 f"{c['replies_repaired']}, unreadable {c['replies_unparseable']}" +
                 (f"; {c['replies_cut_at_max_tokens']} cut at --max_tokens"
                  if c["replies_cut_at_max_tokens"] else ""))
    pairs = f"{c['pairs_proposed']:,} proposed, {c['pairs_kept']:,} kept"
    if c["paraphrases_kept"] or c["paraphrases_invalid"] or c["paraphrases_duplicate"]:
      pairs += (f" + {c['paraphrases_kept']:,} paraphrases ({c['paraphrases_invalid']} invalid, "
                f"{c['paraphrases_duplicate']} duplicate, {c['paraphrases_missing']} missing)")
    lines.append(f"  pairs      {pairs}")
    n_invalid = sum(self.invalid.values())
    detail = ", ".join(f"{validate.REASONS.get(k, k)} {v}" for k, v in self.invalid.most_common())
    lines.append(f"  invalid    {n_invalid}" + (f": {detail}" if detail else ""))
    files = ", ".join(f"{k} {v:,}" for k, v in self.records_in_files.items())
    lines.append(f"  written    {self.records_written:,} records now; the output holds "
                 f"{sum(self.records_in_files.values()):,}" +
                 (f" ({files})" if len(self.records_in_files) > 1 else ""))
    p, q = self.tokens.get("prompt", 0), self.tokens.get("completion", 0)
    lines.append(f"  tokens     {p:,} prompt + {q:,} completion = {p + q:,}")
    if self.skipped_records:
      lines.append(f"  skipped    {self.skipped_records} bad document records")
    if c["chunks_changed_since_last_run"]:
      lines.append(f"  changed    {c['chunks_changed_since_last_run']} chunks differ from the "
                   "last run's text (documents edited): asked again, old records kept")
    if self.dropped_bytes:
      lines.append(f"  resumed    cut {self.dropped_bytes:,} bytes of uncommitted output")
    for e in self.errors[:5]:
      lines.append(f"  failed chunk {e}")
    if len(self.errors) > 5:
      lines.append(f"  ... {len(self.errors) - 5} more failed chunks in the summary JSON")
    return "\n".join(lines)
