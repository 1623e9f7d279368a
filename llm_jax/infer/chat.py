"""Chat over a trained run: ChatML prompts, streamed replies, a multi-turn session, batch answering.

The prompt is rendered by the data room's `encode_chat(..., add_generation_prompt=True)`, the very
template SFT trained on, so the model sees "<|im_start|>assistant\\n" exactly as in training. A
reply ends at <|im_end|> or <|endoftext|> (neither is part of the answer).
"""

import dataclasses
import json
import sys
from typing import Callable, Iterable

import ml_collections

from llm_jax.data import tokenizer as tok_lib
from llm_jax.data.chat_template import encode_chat
from llm_jax.infer.generate import Generation, Generator
from llm_jax.infer.sampling import SamplingConfig
from llm_jax.model.config import ModelConfig


@dataclasses.dataclass
class LoadedRun:
  params: object
  model_cfg: ModelConfig
  tokenizer: object
  config: ml_collections.ConfigDict


def load_run(workdir: str, step: int = -1) -> LoadedRun:
  """Parameters, model shape and tokenizer of a run directory (see llm_jax.train.checkpoint)."""
  from llm_jax.train import checkpoint  # pylint: disable=g-import-not-at-top (pulls in Orbax)
  params, config = checkpoint.load_params(workdir, step)
  with config.unlocked():
    config.data.tokenizer.path = checkpoint.tokenizer_path(workdir, config)
  tok = tok_lib.get_tokenizer(config.data.tokenizer, workdir, corpus_fn=None)
  model_cfg = ModelConfig.from_config(config.model, vocab_size=tok.vocab_size)
  return LoadedRun(params, model_cfg, tok, config)


def end_of_turn_ids(tok) -> list[int]:
  return [i for i in (tok.im_end_id, tok.eos_id) if i is not None]


def prompt_ids(tok, messages: list[dict]) -> list[int]:
  """ChatML ids of `messages` followed by the assistant generation prompt."""
  ids, _ = encode_chat(tok, messages, add_generation_prompt=True, where="chat prompt")
  return ids.tolist()


class TextStream:
  """Turns a token stream into text deltas. Holds back a trailing U+FFFD, which is a multi-byte
  character whose remaining byte tokens have not arrived yet."""

  def __init__(self, tok, write: Callable[[str], None]):
    self.tok, self.write, self.ids, self.shown = tok, write, [], 0

  def __call__(self, row: int, token: int) -> None:
    del row
    self.ids.append(token)
    text = self.tok.decode(self.ids)
    if text.endswith("\ufffd"):
      return
    if len(text) > self.shown:
      self.write(text[self.shown:])
    self.shown = len(text)

  def finish(self, final_text: str) -> None:
    # Stop strings cut the final text; anything not yet shown (held-back bytes) is written now.
    if len(final_text) > self.shown:
      self.write(final_text[self.shown:])


class ChatSession:
  """A multi-turn conversation: `reply(user_text)` generates, streams and remembers the answer."""

  def __init__(self, generator: Generator, tok, sampling: SamplingConfig, *, system: str = "",
               stop_strings: Iterable[str] = (), max_context: int = 0):
    self.generator, self.tok, self.sampling = generator, tok, sampling
    self.system, self.stop_strings, self.max_context = system, tuple(stop_strings), max_context
    self.messages: list[dict] = []
    self.turn = 0
    self.reset()

  def reset(self) -> None:
    self.messages = [{"role": "system", "content": self.system}] if self.system else []

  def _fit(self, messages: list[dict]) -> list[int]:
    """Prompt ids, dropping the oldest exchanges while the prompt + answer exceed max_context."""
    head = 1 if self.system else 0
    while True:
      ids = prompt_ids(self.tok, messages)
      if not self.max_context or len(ids) + self.sampling.max_new_tokens <= self.max_context:
        return ids
      if len(messages) - head <= 1:
        return ids[-max(self.max_context - self.sampling.max_new_tokens, 1):]
      messages = messages[:head] + messages[head + 2:]

  def reply(self, user_text: str, write: Callable[[str], None] | None = None) -> Generation:
    messages = self.messages + [{"role": "user", "content": user_text}]
    stream = TextStream(self.tok, write) if write else None
    sampling = dataclasses.replace(self.sampling, seed=self.sampling.seed + self.turn)
    gen = self.generator.generate([self._fit(messages)], sampling, stop_token_ids=end_of_turn_ids(self.tok),
                                  stop_strings=self.stop_strings, decode_fn=self.tok.decode,
                                  callback=stream)[0]
    if stream:
      stream.finish(gen.text)
    self.turn += 1
    self.messages = messages + [{"role": "assistant", "content": gen.text}]
    return gen


def interactive(session: ChatSession, read: Callable[[str], str] = input,
                write: Callable[[str], None] = sys.stdout.write) -> None:
  """The terminal loop: /reset clears the history, /quit (or EOF) leaves."""
  write("Chat: /reset clears the conversation, /quit leaves.\n")
  while True:
    try:
      line = read("\n> ")
    except (EOFError, KeyboardInterrupt):
      write("\n")
      return
    command = line.strip()
    if command in ("/quit", "/exit"):
      return
    if command == "/reset":
      session.reset()
      write("(conversation cleared)\n")
      continue
    if not command:
      continue
    gen = session.reply(line, write=lambda s: (write(s), sys.stdout.flush()))
    if gen.finish_reason == "length":
      write(" [max_new_tokens reached]")
    write("\n")


def read_prompts(path: str) -> list[dict]:
  """Records of a prompts file: JSONL lines {"prompt": str} or {"messages": [...]}, else plain text
  lines (one prompt each). Blank lines are skipped."""
  records = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      line = line.rstrip("\n")
      if not line.strip():
        continue
      if line.lstrip().startswith("{"):
        try:
          rec = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n}: invalid JSON ({e.msg}); write one JSON object or one plain "
                           "prompt per line") from None
        if not isinstance(rec.get("prompt"), str) and not isinstance(rec.get("messages"), list):
          raise ValueError(f"{path}:{n}: a JSON line needs a string field 'prompt' or a list field "
                           f"'messages' (found keys {sorted(rec)})")
        records.append(rec)
      else:
        records.append({"prompt": line})
  return records


def answer_prompts(generator: Generator, tok, records: list[dict], sampling: SamplingConfig, *,
                   system: str = "", stop_strings: Iterable[str] = (), batch_size: int = 8) -> list[dict]:
  """One answer per record, generated `batch_size` prompts at a time; returns the output records."""
  out = []
  for start in range(0, len(records), batch_size):
    chunk = records[start:start + batch_size]
    prompts = []
    for rec in chunk:
      messages = rec.get("messages") or [{"role": "user", "content": rec["prompt"]}]
      if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
      prompts.append(prompt_ids(tok, messages))
    gens = generator.generate(prompts, sampling, stop_token_ids=end_of_turn_ids(tok),
                              stop_strings=tuple(stop_strings), decode_fn=tok.decode)
    for rec, gen in zip(chunk, gens):
      out.append({**rec, "answer": gen.text, "finish_reason": gen.finish_reason, "n_tokens": len(gen.tokens)})
  return out
