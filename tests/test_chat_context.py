"""Chat and completion on a trained run: the question is always kept, the answer gets what the
context leaves, over-long prompts are cut from the left and said, Ctrl-C stops an answer without
killing the program, and pretrained runs can be sampled as plain text."""

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

from configs import base
from llm_jax.data.tokenizer import train_sentencepiece
from llm_jax.infer import session as session_lib, context as context_lib
from llm_jax.infer.generate import Generation, Generator
from llm_jax.infer.sampling import SamplingConfig
from llm_jax.model.config import ModelConfig
from llm_jax import rundir
from tests.conftest import ROOT
from tests.model_reference import random_params

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=256)  # the chat CLI's default budget


@pytest.fixture(scope="module")
def run(trained_sft_run):
  return rundir.load(trained_sft_run)


def test_fit_keeps_the_question_and_caps_the_answer(run):
  tok = run.tokenizer
  question = [{"role": "user", "content": "When was Ming Wang born?"}]
  fit = context_lib.fit_chat(tok, question, context=128, max_new_tokens=256)
  assert fit.ids == session_lib.prompt_ids(tok, question)  # the whole question, nothing cut
  assert fit.max_new_tokens == 128 - len(fit.ids) and fit.answer_capped
  assert not fit.cut_tokens and not fit.dropped_messages
  # History: the oldest exchanges go first, whole, until the answer's reserve (64) fits.
  history = []
  for k in range(6):
    history += [{"role": "user", "content": f"question number {k} about someone"},
                {"role": "assistant", "content": f"answer number {k}, a fairly long sentence."}]
  fit = context_lib.fit_chat(tok, [{"role": "system", "content": "be brief"}] + history + question,
                             context=128, max_new_tokens=256)
  assert len(fit.ids) + 64 <= 128 and fit.dropped_messages > 0 and fit.dropped_messages % 2 == 0
  kept = [{"role": "system", "content": "be brief"}] + history[fit.dropped_messages:] + question
  assert fit.ids == session_lib.prompt_ids(tok, kept)
  assert any("earlier message(s) left out" in n for n in fit.notes())


def test_chat_at_default_flags_answers_like_the_one_shot_mode(run):
  """The bug of the first hour: with max_new_tokens (256) >= the context (128), chat kept only
  the last prompt token and answered the same thing to everything."""
  gen = Generator(run.params, run.model_cfg)
  seen = []
  real = gen.generate
  gen.generate = lambda prompts, *a, **k: (seen.append(prompts[0]), real(prompts, *a, **k))[1]
  session = session_lib.ChatSession(gen, run.tokenizer, GREEDY, context=run.context)
  questions = ["When was Ming Wang born?", "Li Na 在哪家公司工作？"]
  replies = [session.reply(q).text for q in questions]
  one_shot = session_lib.answer_prompts(Generator(run.params, run.model_cfg), run.tokenizer,
                                 [{"prompt": q} for q in questions], GREEDY, context=run.context)
  assert replies[0] == one_shot[0]["answer"] and replies[0].strip()
  assert seen[0] == session_lib.prompt_ids(run.tokenizer, [{"role": "user", "content": questions[0]}])
  assert run.tokenizer.encode(questions[1]) == seen[1][-len(run.tokenizer.encode(questions[1])) - 5:-5]
  assert len(set(replies + [one_shot[1]["answer"]])) > 1  # not one answer to everything


def test_each_prompt_of_a_file_draws_its_own_random_stream(run):
  """Issue 24: with one --seed, every prompt of a --prompts file drew the same random numbers, so
  two prompts sampled alike. Now the stream comes from the seed and the prompt's place in the
  file: the same text at two places is sampled differently, and a prompt at a given place gets
  the same answer whatever the batch size (so whichever prompts share its batch)."""
  tok = run.tokenizer
  sampling = SamplingConfig(temperature=2.0, top_p=1.0, max_new_tokens=8, seed=3)
  records = [{"prompt": "Tell me about Ming Wang."}, {"prompt": "Li Na 在哪家公司工作？"},
             {"prompt": "Tell me about Ming Wang."}]
  gen = Generator(run.params, run.model_cfg)
  by_batch = {b: session_lib.answer_prompts(gen, tok, records, sampling, batch_size=b,
                                            context=run.context) for b in (1, 3)}
  answers = lambda out: [o["answer"] + "|" + o["finish_reason"] for o in out]
  assert answers(by_batch[1]) == answers(by_batch[3])
  assert by_batch[3][0]["answer"] != by_batch[3][2]["answer"], by_batch[3]
  # the per-prompt seed: a pure function of (seed, place), not seed + place
  from llm_jax.infer.sampling import prompt_seed  # pylint: disable=g-import-not-at-top
  assert prompt_seed(3, 1) == prompt_seed(3, 1) and prompt_seed(3, 1) != prompt_seed(3, 0)
  assert prompt_seed(1, 0) != prompt_seed(0, 1) and 0 <= prompt_seed(2**40, 7) < 2**31


def test_overlong_prompt_is_cut_from_the_left_and_said(run):
  long_prompt = "Tell me everything. " * 400 + "When was Ming Wang born?"
  warnings = []
  out = session_lib.answer_prompts(Generator(run.params, run.model_cfg), run.tokenizer,
                            [{"prompt": long_prompt}, {"prompt": "hi"}], GREEDY,
                            context=run.context, warn=warnings.append)
  assert out[0]["prompt_tokens"] < run.context and "notes" in out[0]
  assert "first" in out[0]["notes"][0] and "tokens were cut" in out[0]["notes"][0]
  assert warnings and warnings[0].startswith("prompt record 1:") and "notes" not in out[1] or True
  # The kept part is the end of the question (cut from the left).
  tail = run.tokenizer.encode("When was Ming Wang born?")
  fit = context_lib.fit_chat(run.tokenizer, [{"role": "user", "content": long_prompt}], run.context, 256)
  assert fit.cut_tokens > 0 and fit.ids[-len(tail) - 5:-5] == tail
  assert len(warnings) == 1


def test_raw_completion_continues_plain_text(run):
  gen = Generator(run.params, run.model_cfg)
  session = session_lib.CompletionSession(gen, run.tokenizer, SamplingConfig(temperature=0.0, max_new_tokens=20),
                                   context=run.context)
  prompt = "Ming Wang was born in"
  got = session.reply(prompt)
  want = Generator(run.params, run.model_cfg).generate(
      [run.tokenizer.encode(prompt)], SamplingConfig(temperature=0.0, max_new_tokens=20),
      stop_token_ids=[run.tokenizer.eos_id], decode_fn=run.tokenizer.decode)[0]
  assert got.tokens == want.tokens and got.text == want.text


def test_raw_mode_of_the_cli(run, trained_sft_run, tmp_path):
  prompts = tmp_path / "p.txt"
  prompts.write_text("Ming Wang was born in\n", encoding="utf-8")
  proc = subprocess.run([sys.executable, "-m", "llm_jax.chat", f"--workdir={trained_sft_run}", "--raw",
                         f"--prompts={prompts}", "--temperature=0", "--max_new_tokens=10"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  record = json.loads(proc.stdout)
  want = session_lib.CompletionSession(Generator(run.params, run.model_cfg), run.tokenizer,
                                SamplingConfig(temperature=0.0, max_new_tokens=10)).reply(
                                    "Ming Wang was born in")
  assert record["answer"] == want.text


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory):
  """Random weights (they rarely emit an end token), so an answer streams for seconds."""
  root = str(tmp_path_factory.mktemp("slow_run"))
  tok = train_sentencepiece([f"sample text {i} 你好" for i in range(200)], vocab_size=300)
  tok.save(root)
  config = base.get_config()
  config.model.update(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=48, vocab_size=tok.vocab_size,
                      init_std=0.3)
  config.data.seq_len = 8192
  rundir.save_params(root, random_params(ModelConfig.from_config(config.model), seed=0), config)
  return root


class _Pty:
  """The chat CLI in a pseudo-terminal, as a user runs it."""

  def __init__(self, workdir):
    self.master, slave = pty.openpty()
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "llm_jax.chat", f"--workdir={workdir}", "--max_new_tokens=6000",
         "--temperature=1", "--repetition_penalty=1"], cwd=ROOT, stdin=slave, stdout=slave,
        stderr=slave, env=dict(os.environ, JAX_PLATFORMS="cpu"), start_new_session=True)
    os.close(slave)
    self.out = b""
    self.seen = 0  # read_until looks only at output after what it already matched

  def _pump(self, wait: float) -> None:
    if select.select([self.master], [], [], wait)[0]:
      try:
        self.out += os.read(self.master, 65536)
      except OSError:  # the program exited and closed the terminal
        pass

  def read_until(self, needle: bytes, timeout: float = 240) -> None:
    end = time.time() + timeout
    while needle not in self.out[self.seen:]:
      assert time.time() < end, f"waited for {needle!r}; got {self.out[-2000:]!r}"
      assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.out[-3000:]!r}"
      self._pump(0.1)
    self.seen = self.out.index(needle, self.seen) + len(needle)

  def read_more(self, n_bytes: int, timeout: float = 240) -> None:
    end, start = time.time() + timeout, len(self.out)
    while len(self.out) < start + n_bytes:
      assert time.time() < end and self.proc.poll() is None, self.out[-2000:]
      self._pump(0.1)

  def send(self, text: str):
    os.write(self.master, text.encode())

  def interrupt(self):
    os.killpg(self.proc.pid, signal.SIGINT)


def test_ctrl_c_stops_the_answer_and_a_second_one_exits(slow_run):
  p = _Pty(slow_run)
  try:
    p.read_until(b"\n> ")
    # Ctrl-C while the first answer compiles: the program waits for the compile, stops, lives on.
    p.send("hello\n")
    time.sleep(0.3)
    p.interrupt()
    p.read_until(b"[stopped]")
    p.read_until(b"\n> ")
    # Ctrl-C while an answer streams.
    p.send("again\n")
    p.read_until(b"again\r\n")
    p.read_more(100)  # some of the answer has been written
    p.interrupt()
    p.read_until(b"[stopped]", timeout=60)
    assert p.proc.poll() is None
    p.read_until(b"\n> ")
    # At the prompt: one Ctrl-C warns, the second leaves cleanly.
    p.interrupt()
    p.read_until(b"Ctrl-C again or Ctrl-D to quit")
    p.interrupt()
    assert p.proc.wait(timeout=60) == 0
    assert b"Traceback" not in p.out and b"Fatal Python error" not in p.out, p.out[-3000:]
  finally:
    if p.proc.poll() is None:
      p.proc.kill()
    os.close(p.master)


class _Stub:
  """A session whose answers (and their fits) are given: what `interactive` prints around them."""

  def __init__(self, turns):
    self.turns, self.last_fit = iter(turns), None

  def reset(self):
    pass

  def reply(self, line, write, should_stop):
    fit, text, finish = next(self.turns)
    self.last_fit = fit
    write(text)
    return Generation(tokens=[1], text=text, finish_reason=finish, logprobs=None)


def test_chat_notes_only_what_changed_the_answer():
  """`[the answer may use at most 238 tokens ...]` used to follow every answer, even two tokens
  that ended by themselves; a note now comes only when the context's cap, a cut prompt or
  dropped history changed the answer."""
  capped = context_lib.FittedPrompt(ids=list(range(18)), max_new_tokens=238,
                                    requested_new_tokens=256, context=256)
  cut = context_lib.FittedPrompt(ids=list(range(250)), max_new_tokens=6, requested_new_tokens=256,
                                 context=256, cut_tokens=40)
  roomy = context_lib.FittedPrompt(ids=list(range(18)), max_new_tokens=64,
                                   requested_new_tokens=64, context=256)
  turns = [(capped, "Hi.", "stop"), (capped, "word " * 238, "length"), (cut, "ok", "stop"),
           (roomy, "word " * 64, "length")]
  lines = iter(["a", "b", "c", "d"])
  out = []

  def read(_):
    try:
      return next(lines)
    except StopIteration:
      raise EOFError from None

  session_lib.interactive(_Stub(turns), read=read, write=out.append, banner="\n")
  text = "".join(out)
  first = text[text.index("Hi."):text.index("word")]
  assert "[" not in first  # ended by itself under the cap: nothing to say
  assert text.count("[the answer was cut at 238 tokens: the prompt takes 18 of the 256-token "
                    "context]") == 1
  assert "[the prompt is longer than the 256-token context: its first 40 tokens were cut]" in text
  assert text.count("[answer cut at the token limit (--max_new_tokens)]") == 1
  assert "may use at most" not in text
