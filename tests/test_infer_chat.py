"""Chat glue on a real (tiny, random-weight) run directory: loading, ChatML prompts, the one-shot file
mode through the CLI, the interactive loop's /reset and /quit, and text streaming."""

import json
import os
import subprocess
import sys

import pytest

from configs import base
from llm_jax.data.chat_template import encode_chat
from llm_jax.data.tokenizer import train_sentencepiece
from llm_jax.infer import session as session_lib
from llm_jax.infer.generate import Generator
from llm_jax.infer.sampling import SamplingConfig
from llm_jax.model.config import ModelConfig
from llm_jax import rundir
from tests.model_reference import random_params

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=6)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("run"))
  corpus = [f"question {i}: what is {i} plus {i}? answer: {2 * i}. 你好，世界 {i}" for i in range(200)]
  tok = train_sentencepiece(corpus, vocab_size=300, model_type="bpe")
  tok.save(root)
  config = base.get_config()
  config.model.update(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=48, vocab_size=tok.vocab_size,
                      init_std=0.3)
  cfg = ModelConfig.from_config(config.model)
  params = random_params(cfg, seed=0)
  rundir.save_params(root, params, config, step=0)
  return root


@pytest.fixture(scope="module")
def run(workdir):
  return rundir.load(workdir)


def test_load_run_and_prompt_template(run):
  tok = run.tokenizer
  assert run.model_cfg.vocab_size == tok.vocab_size
  messages = [{"role": "user", "content": "what is 3 plus 3?"}]
  ids = session_lib.prompt_ids(tok, messages)
  want = ([tok.im_start_id] + tok.encode("user\n") + tok.encode("what is 3 plus 3?") + [tok.im_end_id]
          + tok.encode("\n") + [tok.im_start_id] + tok.encode("assistant\n"))
  assert ids == want


def test_session_history_reset_and_quit(run):
  gen = Generator(run.params, run.model_cfg)
  session = session_lib.ChatSession(gen, run.tokenizer, GREEDY, system="be brief")
  lines = iter(["hello", "what is 2 plus 2?", "/reset", "hello", "/quit", "never read"])
  written = []
  session_lib.interactive(session, read=lambda _: next(lines), write=written.append)
  # After /reset only the last exchange remains, and it equals a fresh session's first reply.
  assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
  fresh = session_lib.ChatSession(gen, run.tokenizer, GREEDY, system="be brief").reply("hello")
  assert session.messages[-1]["content"] == fresh.text
  assert "(conversation cleared)\n" in written
  assert next(lines) == "never read"


def test_second_turn_prompt_contains_the_first_reply(run):
  gen = Generator(run.params, run.model_cfg)
  seen = []
  real = gen.generate
  gen.generate = lambda prompts, *a, **k: (seen.append(prompts[0]), real(prompts, *a, **k))[1]
  session = session_lib.ChatSession(gen, run.tokenizer, GREEDY)
  first = session.reply("hello")
  session.reply("and then?")
  want = encode_chat(run.tokenizer, [{"role": "user", "content": "hello"},
                                     {"role": "assistant", "content": first.text},
                                     {"role": "user", "content": "and then?"}], add_generation_prompt=True)[0]
  assert seen[1] == want.tolist()


def test_text_stream_concatenates_to_the_decoded_text(run):
  tok = run.tokenizer
  ids = tok.encode("你好，世界 answer: 42")
  pieces = []
  stream = session_lib.TextStream(tok, pieces.append)
  for t in ids:
    stream(0, t)
  stream.finish(tok.decode(ids))
  assert "".join(pieces) == tok.decode(ids)


def test_cli_answers_a_prompts_file(run, workdir, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("what is 1 plus 1?\n\n" + json.dumps({"prompt": "hello"}) + "\n"
                     + json.dumps({"messages": [{"role": "user", "content": "你好"}]}, ensure_ascii=False) + "\n",
                     encoding="utf-8")
  out = tmp_path / "answers.jsonl"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-m", "llm_jax.chat", f"--workdir={workdir}", f"--prompts={prompts}",
                         f"--output={out}", "--temperature=0", "--max_new_tokens=6", "--repetition_penalty=1"],
                        cwd=root, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  answers = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
  assert [a.get("prompt") for a in answers] == ["what is 1 plus 1?", "hello", None]
  # Independent of the CLI path: greedy generation on the ChatML prompts built here.
  tok = run.tokenizer
  convs = [[{"role": "user", "content": "what is 1 plus 1?"}], [{"role": "user", "content": "hello"}],
           [{"role": "user", "content": "你好"}]]
  want = Generator(run.params, run.model_cfg).generate(
      [encode_chat(tok, c, add_generation_prompt=True)[0].tolist() for c in convs], GREEDY,
      stop_token_ids=[tok.im_end_id, tok.eos_id], decode_fn=tok.decode)
  assert [a["answer"] for a in answers] == [g.text for g in want]
  assert [a["n_tokens"] for a in answers] == [len(g.tokens) for g in want]


def test_bad_prompts_file_names_the_line(tmp_path):
  p = tmp_path / "p.jsonl"
  p.write_text('{"prompt": "ok"}\n{"question": "no"}\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"p.jsonl:2: .*'prompt'"):
    session_lib.read_prompts(str(p))
