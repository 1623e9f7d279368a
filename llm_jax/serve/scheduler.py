"""Continuous batching: a thread that owns one model's slot cache and serves every request of it.

Requests arrive as `Sequence`s (one per choice). Each loop iteration
  1. drops cancelled sequences (a client went away) and frees their slots,
  2. admits waiting sequences into free slots, taking turns between their owners (clients): one
     client's hundred queued choices never make another client's single request wait for them all,
  3. writes prompts into their rows, at most `prefill_budget` tokens per iteration, in chunks, so a
     long prompt never stalls the rows that are decoding,
  4. dispatches one decode step for every decoding row,
  5. reads the *previous* step's tokens back and hands them to their requests (detokenized, stop
     strings checked): the device already runs the next step while the host does this.
A request therefore joins and leaves between two decode steps, and a slow client only slows its
own event queue, never the loop. Events go out through each sequence's `emit` callback.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Callable

from absl import logging
import numpy as np

from llm_jax.infer.generate import bucket
from llm_jax.infer.sampling import SamplingConfig
from llm_jax.infer.text import Detokenizer, StopMatcher
from llm_jax.serve import slots
from llm_jax.serve.tokens import token_str

TOP_N = 20  # top log-probs computed when any row asks for them (OpenAI allows up to 20)
_SETTINGS_INACTIVE = SamplingConfig(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0).arrays(1)


@dataclasses.dataclass(eq=False)
class Sequence:
  """One choice of one request: continue `prompt` in a slot of the cache."""
  prompt: list[int]
  sampling: SamplingConfig  # its max_new_tokens is the request's max_tokens
  emit: Callable[[dict], None]  # receives this sequence's events, called from the engine thread
  stop_ids: frozenset = frozenset()
  stop_strings: tuple = ()
  logprobs: int | None = None  # None: none; k >= 0: each token's log-prob and the top k
  echo: bool = False  # also score every prompt token (the loglikelihood contract)
  owner: str = ""  # who asked (the client's address): waiting sequences are admitted by turns of owner
  # Filled in by the engine.
  slot: int = -1
  prefilled: int = 0
  dispatched: int = 0  # decode steps dispatched with this sequence active
  tokens: list = dataclasses.field(default_factory=list)
  finish_reason: str | None = None
  stop_token: bool = False  # ended by an end-of-turn token (counted in usage, not returned)
  cancelled: bool = False
  t_submit: float = 0.0
  t_first: float | None = None
  detok: Detokenizer | None = None
  stops: StopMatcher | None = None  # over detok.text
  emitted: int = 0  # characters of detok.text sent to the client
  echo_reads: list = dataclasses.field(default_factory=list)
  settings_row: dict | None = None  # sampling.arrays(1), computed by submit()

  @property
  def max_tokens(self) -> int:
    return self.sampling.max_new_tokens


class Engine:
  """Owns the batched KV cache of one model and the thread that decodes it."""

  def __init__(self, params, cfg, tok, *, name: str, n_slots: int = 16, context: int = 256,
               prefill_chunk: int = 256, prefill_budget: int = 512, min_bucket: int = 32,
               max_waiting: int = 1024, owner_share: float = 0.25):
    self.params, self.cfg, self.tok, self.name = params, cfg, tok, name
    self.n_slots, self.context, self.min_bucket = n_slots, context, min_bucket
    self.cache_len = context
    self.prefill_budget, self.max_waiting = prefill_budget, max_waiting
    # The part of the waiting line one owner may hold: one client cannot fill it for everyone.
    self.max_waiting_per_owner = max(1, int(max_waiting * owner_share))
    self.chunks = [c for c in _pow2_range(min_bucket, prefill_chunk) if c <= max(min_bucket, context)]
    # Rows decoded together: a power of two covering the active rows (a lone request on a CPU
    # costs a 1-row step, not an n_slots-row one). Attention windows: min_bucket * 4^k, then the
    # whole cache (quadrupling keeps the number of compiled shapes small on long contexts).
    self.batches = sorted({min(b, n_slots) for b in _pow2_range(1, bucket(n_slots, 1))})
    self.windows = [w for w in _pow_range(min_bucket, self.cache_len, 4) if w < self.cache_len] + [self.cache_len]
    self.state = self._fresh_state()
    self.slot_seq: list[Sequence | None] = [None] * n_slots
    self.positions = np.zeros(n_slots, np.int64)  # mirrors the device's positions (window choice)
    self.settings = {k: np.repeat(v, n_slots) for k, v in _SETTINGS_INACTIVE.items()}
    # Sequences not yet in a slot: owner -> its line, in the order owners take turns (engine thread).
    self.waiting: collections.OrderedDict[str, collections.deque[Sequence]] = collections.OrderedDict()
    self._inbox: collections.deque[Sequence] = collections.deque()  # submitted, not yet seen by the loop
    self._queued: dict[str, int] = {}  # owner -> sequences in the inbox or waiting (under _cond)
    self._n_queued = 0
    self._cond = threading.Condition()
    self._stop = False
    self._programs: set = set()
    self.stats = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0, "decode_steps": 0,
                  "errors": 0, "cancelled": 0, "peak_batch": 0, "ttft": collections.deque(maxlen=1000),
                  "recent_tokens": collections.deque(maxlen=4096)}
    # Called by the engine thread after each decode step's tokens are handed out (tests pause the
    # loop there to make a race deterministic); None in normal use.
    self.on_step: Callable[[list], None] | None = None
    self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)

  # ---- called from other threads -------------------------------------------------------------

  def start(self) -> "Engine":
    """Starts the engine thread (once: a started engine is left running)."""
    if not self._thread.is_alive():
      self._thread.start()
    return self

  def stop(self) -> None:
    with self._cond:
      self._stop = True
      self._cond.notify()
    if self._thread.ident is not None:  # started
      self._thread.join(timeout=30)

  def submit(self, seqs: list[Sequence]) -> str | None:
    """Queues sequences (one request's, all of one owner); None when queued, else why nothing was
    queued: the waiting line is full, or the owner already holds its share of it. A sequence the
    engine could not run raises ValueError here, in the caller's thread, never in the loop."""
    vocab = self.cfg.vocab_size
    for s in seqs:
      if not s.prompt or min(s.prompt) < 0 or max(s.prompt) >= vocab:
        raise ValueError(f"a prompt is empty or holds token ids outside [0, {vocab})")
      if len(s.prompt) + s.max_tokens > self.cache_len:
        raise ValueError(f"prompt + max_tokens = {len(s.prompt) + s.max_tokens} exceeds the cache of "
                         f"{self.cache_len} tokens")
      s.settings_row = s.sampling.arrays(1)  # any overflow surfaces now
    owners = {s.owner for s in seqs}
    if len(owners) > 1:
      raise ValueError("one submit() takes the sequences of one owner")
    owner = owners.pop() if owners else ""
    with self._cond:
      if self._n_queued + len(seqs) > self.max_waiting:
        return (f"the server's queue is full ({self._n_queued} of {self.max_waiting} choices waiting for a "
                "slot); retry later")
      held = self._queued.get(owner, 0)
      if held + len(seqs) > self.max_waiting_per_owner:
        return (f"this client already has {held} choices waiting for a slot, and may queue at most "
                f"{self.max_waiting_per_owner} (its share of the server's queue); retry when some are done")
      now = time.time()
      for s in seqs:
        s.t_submit = now
        self._inbox.append(s)
      self._queued[owner] = held + len(seqs)
      self._n_queued += len(seqs)
      self._cond.notify()
    return None

  def _dequeued(self, seqs) -> None:
    """Sequences that left the waiting line (admitted or cancelled)."""
    if not seqs:
      return
    with self._cond:
      for s in seqs:
        left = self._queued[s.owner] - 1
        if left:
          self._queued[s.owner] = left
        else:
          del self._queued[s.owner]
      self._n_queued -= len(seqs)

  def cancel(self, seqs: list[Sequence]) -> None:
    with self._cond:
      for s in seqs:
        s.cancelled = True
      self._cond.notify()

  def snapshot(self) -> dict:
    """Figures for /metrics (read without locking: ints and a deque copied)."""
    now = time.time()
    recent = [n for t, n in list(self.stats["recent_tokens"]) if now - t <= 10.0]
    ttft = sorted(self.stats["ttft"])
    pct = lambda q: ttft[min(len(ttft) - 1, int(q * len(ttft)))] if ttft else None
    return {"requests": self.stats["requests"], "prompt_tokens": self.stats["prompt_tokens"],
            "generated_tokens": self.stats["generated_tokens"], "decode_steps": self.stats["decode_steps"],
            "errors": self.stats["errors"], "cancelled": self.stats["cancelled"],
            "peak_batch": self.stats["peak_batch"], "tokens_per_s": sum(recent) / 10.0,
            "waiting": self._n_queued,
            "slots_used": sum(s is not None for s in self.slot_seq), "slots": self.n_slots,
            "ttft_p50_s": pct(0.5), "ttft_p99_s": pct(0.99), "programs": len(self._programs)}

  def programs(self, logprobs: bool = True) -> list[tuple]:
    """Every program a request can reach: ("prefill", chunk, top_n) and ("decode", rows, window);
    top_n = TOP_N is the prefill that scores a prompt (`echo` with log-probs)."""
    out = [("prefill", c, top_n) for top_n in ((0, TOP_N) if logprobs else (0,)) for c in self.chunks]
    return out + [("decode", b, w) for b in self.batches for w in self.windows]

  def warmup(self, logprobs: bool = True, progress: Callable[[int, int, tuple], None] | None = None) -> float:
    """Compiles every program now (before serving), so no request waits on XLA: every decode shape
    and prefill chunk, with `logprobs` also the prefill that scores prompts (`echo`). Call it before
    start(). `progress(done, total, program)` follows each one."""
    start = time.time()
    todo = self.programs(logprobs)
    for k, program in enumerate(todo):
      if program[0] == "prefill":
        _, c, top_n = program
        self._prefill(0, np.zeros(c, np.int32), 0, 1, np.zeros(c, np.int32), top_n)
      else:
        _, b, w = program
        self._decode(np.arange(b, dtype=np.int32), np.zeros(b, bool), w)
      if progress is not None:
        progress(k + 1, len(todo), program)
    import jax  # pylint: disable=g-import-not-at-top
    jax.block_until_ready(self.state)
    return time.time() - start

  # ---- device calls ----------------------------------------------------------------------------

  def _fresh_state(self) -> dict:
    # Committed to the device like every jitted output, so the first call after warm-up finds the
    # programs compiled for committed inputs (jit keys on it) instead of compiling again.
    import jax  # pylint: disable=g-import-not-at-top
    return jax.device_put(slots.init_state(self.cfg, self.n_slots, self.cache_len), jax.devices()[0])

  def _prefill(self, slot, tokens_C, start, length, targets_C, top_n):
    self._programs.add(("prefill", len(tokens_C), top_n))
    i32 = lambda v: np.asarray(v, np.int32)
    self.state, out = slots.prefill_chunk(self.params, self.state, i32(slot), tokens_C, i32(start),
                                          i32(length), targets_C, cfg=self.cfg, top_n=top_n)
    return out

  def _decode(self, rows_B, active_B, window):
    self._programs.add(("decode", len(rows_B), window))
    # Fresh arrays (the step may read its inputs after this returns, and self.settings changes).
    # Top log-probs are always computed: one program per shape instead of two, for a top-k over
    # the vocabulary that costs little next to the step.
    settings = {k: v[rows_B] for k, v in self.settings.items()}
    self.state, out = slots.decode_step(self.params, self.state, settings, rows_B, active_B, cfg=self.cfg,
                                        window=window, top_n=TOP_N)
    return out

  # ---- the loop --------------------------------------------------------------------------------

  def _run(self) -> None:
    pending = None
    while True:
      with self._cond:
        while (not self._stop and not self._inbox and not self.waiting and pending is None
               and not any(self.slot_seq)):
          self._cond.wait()
        if self._stop:
          break
        for s in self._inbox:
          line = self.waiting.get(s.owner)
          if line is None:
            line = self.waiting[s.owner] = collections.deque()
          line.append(s)
        self._inbox.clear()
      try:
        self._drop_cancelled()
        self._admit()
        self._prefill_some()
        dispatched = self._dispatch_decode()
        if pending is not None:
          self._process(*pending)
          if self.on_step is not None:
            self.on_step(pending[1])
        pending = dispatched
        self._finish_echo_only()
      except Exception as e:  # pylint: disable=broad-except
        # Whatever failed, the requests in flight get an error and the server goes on.
        logging.exception("engine %s: a step failed; failing the requests in flight", self.name)
        self.stats["errors"] += 1
        pending = None
        for s in list(self.slot_seq):
          if s is not None:
            self._finish(s, "error", error=f"internal error while decoding: {type(e).__name__}: {e}")
        self.state = self._fresh_state()
    for s in list(self.slot_seq) + [s for line in self.waiting.values() for s in line] + list(self._inbox):
      if s is not None and s.finish_reason is None:
        s.finish_reason = "error"
        s.emit({"type": "error", "message": "the server is shutting down"})

  def _drop_cancelled(self) -> None:
    dropped = []
    for owner, line in list(self.waiting.items()):
      if any(s.cancelled for s in line):
        kept = collections.deque()
        for s in line:
          if s.cancelled:
            s.finish_reason = "cancelled"
            self.stats["cancelled"] += 1
            dropped.append(s)
          else:
            kept.append(s)
        if kept:
          self.waiting[owner] = kept
        else:
          del self.waiting[owner]
    self._dequeued(dropped)
    for s in self.slot_seq:
      if s is not None and s.cancelled:
        self._free(s)

  def _admit(self) -> None:
    admitted = []
    for slot in range(self.n_slots):
      if not self.waiting:
        break
      if self.slot_seq[slot] is None:
        # The owner whose turn it is gives its oldest sequence, then waits behind the others.
        owner, line = next(iter(self.waiting.items()))
        s = line.popleft()
        if line:
          self.waiting.move_to_end(owner)
        else:
          del self.waiting[owner]
        admitted.append(s)
        s.slot, s.prefilled = slot, 0
        self.slot_seq[slot] = s
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(s.prompt)
        # Decoding resumes after the prompt; its last tokens give the first delta's context.
        s.detok = Detokenizer(self.tok.decode, s.prompt[-4:])
        s.stops = StopMatcher(s.stop_strings)
    self._dequeued(admitted)

  def _prefill_some(self) -> None:
    budget = self.prefill_budget
    for s in self.slot_seq:
      if s is None or s.prefilled >= len(s.prompt):
        continue
      while s.prefilled < len(s.prompt) and budget > 0:
        remaining = len(s.prompt) - s.prefilled
        chunk = next((c for c in self.chunks if c >= remaining), self.chunks[-1])
        length = min(chunk, remaining)
        start = s.prefilled
        tokens = np.zeros(chunk, np.int32)
        tokens[:length] = s.prompt[start:start + length]
        targets = np.zeros(chunk, np.int32)
        nxt = s.prompt[start + 1:start + 1 + chunk]
        targets[:len(nxt)] = nxt
        out = self._prefill(s.slot, tokens, start, length, targets, TOP_N if s.echo else 0)
        if s.echo:
          s.echo_reads.append((length, out))
        s.prefilled += length
        budget -= chunk
      if s.prefilled >= len(s.prompt):
        self.positions[s.slot] = len(s.prompt)
        self._set_settings(s)
      if budget <= 0:
        return

  def _set_settings(self, s: Sequence) -> None:
    for k, v in s.settings_row.items():
      self.settings[k][s.slot] = v[0]

  def _decoding(self) -> list[Sequence]:
    return [s for s in self.slot_seq if s is not None and s.prefilled >= len(s.prompt)
            and s.dispatched < s.max_tokens and s.finish_reason is None]

  def _dispatch_decode(self):
    rows = self._decoding()
    if not rows:
      return None
    batch = next(b for b in self.batches if b >= len(rows))
    used = {s.slot for s in rows}
    padding = [i for i in range(self.n_slots) if i not in used][:batch - len(rows)]  # distinct, inactive
    rows_B = np.array([s.slot for s in rows] + padding, np.int32)
    active_B = np.arange(batch) < len(rows)
    longest = int(max(self.positions[s.slot] for s in rows)) + 1
    window = next(w for w in self.windows if w >= min(longest, self.cache_len))
    out = self._decode(rows_B, active_B, window)
    for s in rows:
      s.dispatched += 1
      self.positions[s.slot] += 1
    self.stats["decode_steps"] += 1
    self.stats["peak_batch"] = max(self.stats["peak_batch"], len(rows))
    return out, list(enumerate(rows))

  def _process(self, out, rows) -> None:
    token = np.asarray(out["token"])
    logprob = np.asarray(out["logprob"])
    top_lp = np.asarray(out["top_logprob"]) if "top_logprob" in out else None
    top_id = np.asarray(out["top_id"]) if "top_id" in out else None
    now = time.time()
    n_new = 0
    for row, s in rows:
      if s.finish_reason is not None or s.cancelled:
        continue  # finished while this step ran; its row's token is discarded
      if s.echo_reads:
        self._emit_echo(s)
      if s.t_first is None:
        s.t_first = now
        self.stats["ttft"].append(now - s.t_submit)
      n_new += 1
      self._accept(s, int(token[row]), float(logprob[row]),
                   None if top_id is None else (top_id[row], top_lp[row]))
    self.stats["generated_tokens"] += n_new
    self.stats["recent_tokens"].append((now, n_new))

  def _accept(self, s: Sequence, token: int, logprob: float, top) -> None:
    if token in s.stop_ids:
      s.stop_token = True
      if s.logprobs is not None:
        # The end token is scored but not part of the text: a client summing the log-probs of a
        # prompt's continuation (lm-eval takes all but the last entry) must find it there.
        s.emit({"type": "delta", "text": "", "tokens": [token], "offsets": [len(s.detok.text)],
                "logprobs": [logprob], "top": [self._top_entries(top, s.logprobs)], "stop_token": True})
      self._finish(s, "stop")
      return
    s.tokens.append(token)
    offset = len(s.detok.text)
    s.detok.add(token)
    entry = {"type": "delta", "tokens": [token], "offsets": [offset]}
    if s.logprobs is not None:
      entry["logprobs"] = [logprob]
      entry["top"] = [self._top_entries(top, s.logprobs)]
    self._emit_text(s, entry, final=False)
    if s.finish_reason is None and len(s.tokens) >= s.max_tokens:
      self._finish(s, "length")

  def _top_entries(self, top, k: int) -> list:
    if top is None or not k:
      return []
    ids, lps = top
    return [(int(i), float(lp)) for i, lp in zip(ids[:k], lps[:k])]

  def _emit_text(self, s: Sequence, entry: dict, final: bool) -> None:
    """Sends the text that is certain: up to a stop string (then finishes), or up to the longest
    tail that could still become one."""
    text = s.detok.text
    end = max(s.stops.certain(text, final), s.emitted)  # held-back text never holds a whole stop string
    entry["text"] = text[s.emitted:end]
    s.emitted = end
    s.emit(entry)
    if s.stops.at is not None:
      self._finish(s, "stop", text_cut=end)

  def _emit_echo(self, s: Sequence) -> None:
    """Log-probs of the prompt's tokens (the first has none), read back once its prefill is done."""
    logprobs, tops = [None], [None]
    for length, out in s.echo_reads:
      tl = np.asarray(out["target_logprob"])[:length]
      tv, ti = np.asarray(out["top_logprob"]), np.asarray(out["top_id"])
      for i in range(length):
        logprobs.append(float(tl[i]))
        tops.append(self._top_entries((ti[i], tv[i]), s.logprobs or 0))
    s.echo_reads = []
    n = len(s.prompt)
    s.emit({"type": "prompt", "logprobs": logprobs[:n], "top": tops[:n]})

  def _finish_echo_only(self) -> None:
    """max_tokens == 0 with echo: the prompt is scored, nothing is generated."""
    for s in self.slot_seq:
      if s is not None and s.max_tokens == 0 and s.prefilled >= len(s.prompt) and s.finish_reason is None:
        if s.echo_reads:
          self._emit_echo(s)
        self._finish(s, "length")

  def _finish(self, s: Sequence, reason: str, text_cut: int | None = None, error: str = "") -> None:
    if s.finish_reason is not None:
      return
    if reason == "error":
      s.finish_reason = "error"
      s.emit({"type": "error", "message": error})
      self._free(s)
      return
    if text_cut is None:
      s.detok.finish()
      entry = {"type": "delta", "tokens": [], "offsets": []}
      if s.logprobs is not None:
        entry.update(logprobs=[], top=[])
      self._emit_text(s, entry, final=True)
      if s.finish_reason is not None:  # the flushed text held a stop string
        return
    s.finish_reason = reason
    s.emit({"type": "done", "finish_reason": reason, "completion_tokens": len(s.tokens) + s.stop_token,
            "text": s.detok.text[:s.emitted]})
    self._free(s)

  def _free(self, s: Sequence) -> None:
    if 0 <= s.slot < self.n_slots and self.slot_seq[s.slot] is s:
      self.slot_seq[s.slot] = None
      for k, v in _SETTINGS_INACTIVE.items():
        self.settings[k][s.slot] = v[0]
    if s.finish_reason is None and s.cancelled:
      s.finish_reason = "cancelled"
      self.stats["cancelled"] += 1

  # Token strings for responses (the HTTP layer calls these with ids from events).
  def token_str(self, i: int) -> str:
    return token_str(self.tok, i)


def _pow2_range(lo: int, hi: int) -> list[int]:
  return _pow_range(bucket(lo, 1), hi, 2)


def _pow_range(lo: int, hi: int, factor: int) -> list[int]:
  """lo, lo * factor, lo * factor^2, ... up to max(hi, lo)."""
  out, c = [], lo
  while c <= max(hi, lo):
    out.append(c)
    c *= factor
  return out
