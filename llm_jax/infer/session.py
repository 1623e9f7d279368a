"""Chat over a trained run: ChatML prompts, streamed replies, a multi-turn session, plain-text
completion for pretrained runs, and batch answering of a prompts file.

The prompt is rendered by the data room's `encode_chat(..., add_generation_prompt=True)`, the very
template SFT trained on, so the model sees "<|im_start|>assistant\\n" exactly as in training. A
reply ends at <|im_end|> or <|endoftext|> (neither is part of the answer). Prompt and answer are
fitted into the run's context window by `context.py`, which says what it had to cut.
"""

import dataclasses
import functools
import sys
from typing import Callable, Iterable

from llm_jax.data.chat_template import encode_chat
from llm_jax.data.sources import read_records
from llm_jax.infer import context as context_lib
from llm_jax.infer.generate import Generation, Generator
from llm_jax.infer.interrupt import Interrupts, read_line
from llm_jax.infer.sampling import SamplingConfig, prompt_seed
from llm_jax.infer.text import Detokenizer


def end_of_turn_ids(tok) -> list[int]:
  return [i for i in (tok.im_end_id, tok.eos_id) if i is not None]


def prompt_ids(tok, messages: list[dict]) -> list[int]:
  """ChatML ids of `messages` followed by the assistant generation prompt."""
  ids, _ = encode_chat(tok, messages, add_generation_prompt=True, where="chat prompt")
  return ids.tolist()


class TextStream:
  """Turns a token stream into text deltas (a `Detokenizer`: a multi-byte character whose remaining
  byte tokens have not arrived yet is held back)."""

  def __init__(self, tok, write: Callable[[str], None]):
    self.detok, self.write = Detokenizer(tok.decode), write

  def __call__(self, row: int, token: int) -> None:
    del row
    delta = self.detok.add(token)
    if delta:
      self.write(delta)

  def finish(self, final_text: str) -> None:
    # Stop strings cut the final text; anything not yet shown (held-back bytes) is written now.
    shown = len(self.detok.text)
    if len(final_text) > shown:
      self.write(final_text[shown:])


class ChatSession:
  """A multi-turn conversation: `reply(user_text)` generates, streams and remembers the answer.

  Every turn is fitted into `context` tokens (context.fit_chat); `last_fit` says what was cut.
  """

  def __init__(self, generator: Generator, tok, sampling: SamplingConfig, *, system: str = "",
               stop_strings: Iterable[str] = (), context: int = 0):
    self.generator, self.tok, self.sampling = generator, tok, sampling
    self.system, self.stop_strings = system, tuple(stop_strings)
    self.context = context or (1 << 30)
    self.messages: list[dict] = []
    self.turn = 0
    self.last_fit: context_lib.FittedPrompt | None = None
    self.reset()

  def reset(self) -> None:
    self.messages = [{"role": "system", "content": self.system}] if self.system else []

  def _fit(self, messages: list[dict]) -> context_lib.FittedPrompt:
    return context_lib.fit_chat(self.tok, messages, self.context, self.sampling.max_new_tokens)

  def reply(self, user_text: str, write: Callable[[str], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> Generation:
    messages = self.messages + [{"role": "user", "content": user_text}]
    fit = self.last_fit = self._fit(messages)
    gen = _generate_one(self.generator, self.tok, fit, self.sampling, self.turn, write, should_stop,
                        end_of_turn_ids(self.tok), self.stop_strings)
    self.turn += 1
    self.messages = messages + [{"role": "assistant", "content": gen.text}]
    return gen


class CompletionSession:
  """Plain-text continuation (no chat template) for pretrained runs: each prompt is continued
  until <|endoftext|> or the token budget. There is no history; /reset does nothing."""

  def __init__(self, generator: Generator, tok, sampling: SamplingConfig, *,
               stop_strings: Iterable[str] = (), context: int = 0):
    self.generator, self.tok, self.sampling = generator, tok, sampling
    self.stop_strings = tuple(stop_strings)
    self.context = context or (1 << 30)
    self.turn = 0
    self.last_fit: context_lib.FittedPrompt | None = None

  def reset(self) -> None:
    pass

  def reply(self, text: str, write: Callable[[str], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> Generation:
    fit = self.last_fit = context_lib.fit_text(self.tok, text, self.context,
                                               self.sampling.max_new_tokens)
    stops = [self.tok.eos_id] if self.tok.eos_id is not None else []
    gen = _generate_one(self.generator, self.tok, fit, self.sampling, self.turn, write, should_stop,
                        stops, self.stop_strings)
    self.turn += 1
    return gen


def _generate_one(generator, tok, fit, sampling, turn, write, should_stop, stop_ids,
                  stop_strings) -> Generation:
  stream = TextStream(tok, write) if write else None
  sampling = dataclasses.replace(sampling, seed=sampling.seed + turn,
                                 max_new_tokens=fit.max_new_tokens)
  gen = generator.generate([fit.ids], sampling, stop_token_ids=stop_ids, stop_strings=stop_strings,
                           decode_fn=tok.decode, callback=stream, should_stop=should_stop)[0]
  if stream:
    stream.finish(gen.text)
  return gen


def interactive(session, read: Callable[[str], str] = read_line,
                write: Callable[[str], None] = sys.stdout.write,
                interrupts: Interrupts | None = None, banner: str = "") -> None:
  """The terminal loop. /reset clears the history, /quit or Ctrl-D leaves. Ctrl-C stops the
  answer being written; Ctrl-C at the prompt, twice in a row, leaves."""
  interrupts = interrupts or Interrupts()
  if read is read_line:
    read = functools.partial(read_line, interrupted=interrupts.take_prompt_interrupt)
  out = lambda s: (write(s), sys.stdout.flush())
  raw = isinstance(session, CompletionSession)
  out(banner or ("Text completion: each line is continued as plain text. /quit or Ctrl-D leaves; "
                 "Ctrl-C stops an answer.\n" if raw else
                 "Chat: /reset clears the conversation, /quit or Ctrl-D leaves; Ctrl-C stops an "
                 "answer.\n"))
  interrupted_at_prompt = False
  while True:
    try:
      line = read("\n> ")
    except EOFError:
      out("\n")
      return
    except KeyboardInterrupt:
      if interrupted_at_prompt:
        out("\n")
        return
      interrupted_at_prompt = True
      out("\n(Ctrl-C again or Ctrl-D to quit)")
      continue
    interrupted_at_prompt = False
    command = line.strip()
    if command in ("/quit", "/exit"):
      return
    if command == "/reset":
      session.reset()
      out("(conversation cleared)\n")
      continue
    if not command:
      continue
    with interrupts.busy():
      gen = session.reply(line, write=out, should_stop=interrupts.should_stop)
    fit = session.last_fit
    notes = fit.notes(gen.finish_reason) if fit else []
    if gen.finish_reason == "interrupted":
      notes.append("stopped")
    elif gen.finish_reason == "length" and not (fit and fit.answer_capped):
      notes.append("answer cut at the token limit (--max_new_tokens)")
    out("\n" + "".join(f"[{n}]\n" for n in notes))


def read_prompts(path: str) -> list[dict]:
  """Records of a prompts file: JSONL lines {"prompt": str} or {"messages": [...]}, else plain text
  lines (one prompt each). Blank lines are skipped."""
  records = []
  hint = "write one JSON object or one plain prompt per line"
  for where, rec in read_records(path, hint, plain_lines=True):
    if isinstance(rec, str):
      records.append({"prompt": rec})
    elif isinstance(rec.get("prompt"), str) or isinstance(rec.get("messages"), list):
      records.append(rec)
    else:
      raise ValueError(f"{where}: a JSON line needs a string field 'prompt' or a list field "
                       f"'messages' (found keys {sorted(rec)})")
  return records


def answer_prompts(generator: Generator, tok, records: list[dict], sampling: SamplingConfig, *,
                   system: str = "", stop_strings: Iterable[str] = (), batch_size: int = 8,
                   context: int = 0, raw: bool = False,
                   warn: Callable[[str], None] | None = None) -> list[dict]:
  """One answer per record, generated `batch_size` prompts at a time; returns the output records.

  Chat records are rendered with ChatML (raw=False) or continued as plain text (raw=True, which
  takes "prompt" records only). A prompt longer than `context` is cut from the left; the output
  record then has "notes" saying so, and `warn` is called with a line naming the record.
  """
  context = context or (1 << 30)
  fits = []
  for k, rec in enumerate(records):
    if raw:
      if "prompt" not in rec:
        raise ValueError(f"prompt record {k + 1}: --raw continues plain text and needs 'prompt', "
                         "not 'messages'")
      fits.append(context_lib.fit_text(tok, rec["prompt"], context, sampling.max_new_tokens))
      continue
    messages = rec.get("messages") or [{"role": "user", "content": rec["prompt"]}]
    if system and messages[0]["role"] != "system":
      messages = [{"role": "system", "content": system}] + messages
    fits.append(context_lib.fit_chat(tok, messages, context, sampling.max_new_tokens))
  stop_ids = ([tok.eos_id] if tok.eos_id is not None else []) if raw else end_of_turn_ids(tok)
  out = []
  for start in range(0, len(records), batch_size):
    chunk = list(zip(records[start:start + batch_size], fits[start:start + batch_size]))
    # Each prompt its own random stream, from the seed and its place in the file (not its batch).
    per_row = [dataclasses.replace(sampling, max_new_tokens=fit.max_new_tokens,
                                   seed=prompt_seed(sampling.seed, start + k))
               for k, (_, fit) in enumerate(chunk)]
    gens = generator.generate([fit.ids for _, fit in chunk], per_row, stop_token_ids=stop_ids,
                              stop_strings=tuple(stop_strings), decode_fn=tok.decode)
    for k, ((rec, fit), gen) in enumerate(zip(chunk, gens)):
      result = {**rec, "answer": gen.text, "finish_reason": gen.finish_reason,
                "n_tokens": len(gen.tokens), "prompt_tokens": len(fit.ids)}
      if fit.notes(gen.finish_reason):
        result["notes"] = fit.notes(gen.finish_reason)
      if warn and (fit.cut_tokens or fit.dropped_messages):
        warn(f"prompt record {start + k + 1}: " + "; ".join(fit.notes()))
      out.append(result)
  return out
