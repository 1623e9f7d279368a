"""Every ```bash command of README.md and docs/*.md, run as a user runs it on a fresh clone.

The commands are read from the pages themselves: README.md, then each docs/ page in the order of
`PAGES` (the order a reader follows them; a docs/*.md page missing from `PAGES` fails the test),
each in document order. Every command is looked up in `RULES` below: it is either run (as written,
in one temporary directory standing for the clone's root, with flags appended that shrink it to a
few steps) or skipped with a stated reason (it needs the network, an accelerator, a cluster, a
model server, ...). A command that no rule matches fails the test, so a new or edited command
cannot rot unnoticed: add it to `RULES`. A command may use what a later page's command makes
(`needs=`): it runs once that exists.

  test_readme_quick_start   the Quick start path: SFT, chat (typed and --prompts), eval, resume
  test_readme_walk (slow)   every command of the pages; `--run-slow` or LLM_JAX_SLOW=1 runs it
  test_doc_links            every relative link of the pages reaches a file (and a heading)
"""

import dataclasses
import glob
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The pages whose commands are walked, in this order (the order a reader follows them, and today's
# order of the commands that depend on each other). Every docs/*.md page must be listed here.
PAGES = ("README.md", "docs/notebooks.md", "docs/serving.md", "docs/training.md", "docs/post_training.md",
         "docs/data.md", "docs/synth.md", "docs/eval.md", "docs/huggingface.md", "docs/gguf.md",
         "docs/scaling.md", "docs/models.md", "docs/benchmarks.md", "docs/experiments.md", "docs/testing.md")

# Appended to `python -m llm_jax.main` training commands: a few steps, one checkpoint, one small
# evaluation. Later flags override the command's own (`--config.train.steps=2000` becomes 4).
TINY = ("--config.train.steps=4", "--config.train.warmup_steps=1", "--config.train.eval_every=4",
        "--config.train.eval_batches=1", "--config.checkpoint.every=4", "--config.train.log_every=2")
# The presets minimind-26m / minimind-moe take minutes per step on a CPU: one layer, short rows.
SMALL_MODEL = ("--config.model.n_layers=1", "--config.data.seq_len=128", "--config.data.batch_size=8")
# Eval jobs: a batch of loss, a few short generations.
TINY_EVAL = ("--config.eval.max_batches=1", "--config.eval.max_examples=4", "--config.eval.max_new_tokens=8",
             "--config.eval.knowledge_people=1", "--config.eval.rep_prefix=8",
             "--config.eval.rep_continuation=8", "--config.eval.batch_size=4")
EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


# Files a user brings (their chats, prompts, corpora, eval sets), written small into the clone.
def _chats(n, topic):
  return "".join(json.dumps({"messages": [
      {"role": "user", "content": f"What is {topic} number {i}?"},
      {"role": "assistant", "content": f"{topic.capitalize()} number {i} is {i * 7 % 13} apples."}]},
      ensure_ascii=False) + "\n" for i in range(n))


def _alpaca(n):
  return json.dumps([{"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 2 else "Show the sum.",
                      "output": f"{i} + {i + 1} = {2 * i + 1}."} for i in range(n)], indent=1)


def _corpus(n):
  return "".join(json.dumps({"text": f"Document {i}: the river {i % 17} runs past the town of "
                                     f"Kell{i % 29} and the hill {i * 3 % 31}. 河流{i % 11}流过城镇。"})
                 + "\n" for i in range(n))


def _choice_csv(n):
  rows = ["id,question,A,B,C,D,answer"]
  rows += [f"{i},{i} + 1 = ?,{i + 1},{i + 2},{i},{i + 3},A" for i in range(n)]
  return "\n".join(rows) + "\n"


USER_FILES = {
    "questions.txt": "Who is the first person you know?\n你好，请介绍一下你自己。\n",
    "chats.jsonl": _chats(40, "fruit"),
    "alpaca.json": _alpaca(40),
    "heldout.jsonl": _chats(10, "stone"),
    "corpus.jsonl": _corpus(300),
    "more.txt": "".join(f"Line {i} of more text about lakes and hills, 湖{i % 7}与山。\n" for i in range(200)),
    "qa.train.jsonl": _chats(40, "lake"),
    "qa.val.jsonl": _chats(10, "lake"),
    "my_chats.jsonl": _chats(40, "cloud"),
    "my_eval.jsonl": "".join(json.dumps({"prompt": f"What is {i} + 1?", "reference": f"{i + 1}"}) + "\n"
                             for i in range(6)),
    "ceval_val.csv": _choice_csv(6),
    "ceval_dev.csv": _choice_csv(5),
}


@dataclasses.dataclass(frozen=True)
class Rule:
  command: str  # the documented command, comments and line continuations removed; or a regex with `regex`
  skip: str = ""  # why it is not run ("" = run it)
  args: tuple[str, ...] = ()  # appended to the command (to its first simple command in a shell loop)
  env: dict | None = None  # extra environment
  stdin: str | None = None  # piped to the command (interactive chat)
  files: tuple[str, ...] = ()  # USER_FILES written into the clone first
  links: tuple[tuple[str, str], ...] = ()  # (link, target) made first: runs the user brings
  needs: tuple[str, ...] = ()  # paths a later command (of any page) makes: run it once they exist
  outputs: tuple[str, ...] = ()  # paths that must exist afterwards
  expect: tuple[str, ...] = ()  # text its console output (stdout and stderr) must hold
  server: bool = False  # a server: started, asked for its models and one answer, stopped with Ctrl-C
  quick: bool = False  # part of the default (fast) test
  regex: bool = False
  timeout: int = 900

  def matches(self, command: str) -> bool:
    if self.regex:
      return re.fullmatch(self.command, command) is not None
    return self.command == command


QUICK_SFT = ("--config.train.steps=40", "--config.train.warmup_steps=5", "--config.train.eval_every=40",
             "--config.checkpoint.every=20")
CHAT_SHORT = ("--max_new_tokens=12",)
SERVE_SMALL = ("--port=0", "--warmup=false", "--slots=2")

RULES = [
    # README.md: Install and Tests
    Rule("pip install -r requirements.txt",
         skip="installs packages (needs the network); the test runs in the installed environment"),
    Rule("pip install -e .",
         skip="installs the package; tests/test_packaging.py installs it into a fresh venv (slow) "
              "and runs commands from another directory"),
    Rule("pip install -r requirements.txt -r tests/requirements.txt",
         skip="installs packages (needs the network); the test runs in the installed environment"),
    Rule("python -m pytest -q tests", skip="the test suite itself"),
    Rule("python -m pytest -q tests/test_readme.py --run-slow", skip="this test itself"),
    # README.md: Quick start
    Rule("python -m llm_jax.main --config=configs/sft.py --workdir=runs/sft", args=QUICK_SFT, quick=True,
         outputs=("runs/sft/config.json", "runs/sft/tokenizer.model", "runs/sft/final_metrics.json",
                  "runs/sft/checkpoints/40")),
    Rule("python -m llm_jax.chat --workdir=runs/sft", args=CHAT_SHORT, quick=True,
         stdin="Who is the first person you know?\n/reset\n你好\n", expect=("(conversation cleared)",)),
    Rule("python -m llm_jax.chat --workdir=runs/sft --prompts=questions.txt --output=answers.jsonl "
         "--temperature=0", args=CHAT_SHORT, files=("questions.txt",), outputs=("answers.jsonl",), quick=True),
    Rule("python -m llm_jax.chat --workdir=runs/pre --raw --temperature=0.8", args=CHAT_SHORT,
         stdin="The river\n", needs=("runs/pre/checkpoints",), expect=("runs/pre: step 4",)),
    Rule("python -m llm_jax.main --config=configs/eval.py --workdir=runs/sft --config.eval.tasks=knowledge",
         args=("--config.eval.knowledge_people=2",), outputs=("runs/sft/eval_40.json",),
         expect=("trained people", "held-out people")),
    Rule("python -m llm_jax.main --config=configs/eval.py --workdir=runs/sft", args=("--config.eval.max_batches=8",),
         outputs=("runs/sft/eval_40.json",), quick=True),
    # Resume: 4 steps more than the first run, from its last checkpoint.
    Rule("until python -m llm_jax.main --config=configs/sft.py --workdir=runs/sft ; do sleep 1 ; done",
         args=QUICK_SFT[1:] + ("--config.train.steps=44",), outputs=("runs/sft/checkpoints/44",), quick=True),
    # docs/notebooks.md
    Rule("python -m pytest -q tests/test_notebooks.py", skip="tests of the suite (the notebooks run in CI)"),
    # docs/serving.md: on a free port (port 8000 may be taken on a shared machine), compiling shapes on first use.
    Rule("python -m llm_jax.serve --workdir=runs/sft", server=True, args=SERVE_SMALL),
    Rule("python -m llm_jax.serve --workdir=runs/sft --workdir=runs/sft2:pretrained --port=8000 --api_key=secret",
         server=True, args=SERVE_SMALL, needs=("runs/sft2/checkpoints",)),
    # docs/training.md: configs and presets, pretrain then fine-tune
    Rule("python -m llm_jax.main --config=configs/pretrain.py --workdir=runs/pre-512 --config.train.steps=2000 "
         "--config.train.lr=1e-3 --config.data.seq_len=512", args=TINY, outputs=("runs/pre-512/checkpoints/4",)),
    Rule("python -m llm_jax.main --config=configs/pretrain.py:minimind-26m --workdir=runs/mm "
         "--config.data.tokenizer.vocab_size=6400 --config.model.n_layers=6", args=TINY + SMALL_MODEL,
         outputs=("runs/mm/checkpoints/4",)),
    Rule("python -m llm_jax.main --config=configs/pretrain.py --workdir=runs/pre", args=TINY,
         outputs=("runs/pre/checkpoints/4",)),
    Rule("python -m llm_jax.main --config=configs/sft.py --workdir=runs/sft2 --config.init_from=runs/pre",
         args=TINY, outputs=("runs/sft2/checkpoints/4",)),
    # docs/post_training.md: DPO, distillation, LoRA
    Rule("python -m llm_jax.main --config=configs/dpo.py --workdir=runs/dpo --config.init_from=runs/sft",
         args=TINY, outputs=("runs/dpo/checkpoints/4",)),
    Rule("python -m llm_jax.main --config=configs/grpo.py --workdir=runs/grpo --config.init_from=runs/sft",
         args=TINY + ("--config.data.batch_size=8", "--config.grpo.num_generations=4",
                      "--config.grpo.max_new_tokens=8"), outputs=("runs/grpo/checkpoints/4",),
         expect=("eval at step 4",)),
    Rule("python -m llm_jax.rl.demo --workdir=runs/grpo_demo", args=("--quick",),
         outputs=("runs/grpo_demo/grpo_demo.png", "runs/grpo_demo/summary.json")),
    Rule("python -m llm_jax.rl.bench --preset=minimind-26m",
         args=("--steps=1", "--prompts=1", "--generations=2", "--prompt_len=8", "--max_new=4"),
         expect=("rollout",)),
    Rule("python -m llm_jax.main --config=configs/distill.py --workdir=runs/distill --config.init_from=runs/sft",
         args=TINY, outputs=("runs/distill/checkpoints/4",)),
    Rule("python -m llm_jax.chat --workdir=runs/distill --show_reasoning", args=CHAT_SHORT,
         stdin="Where was the first person born?\n", expect=("runs/distill: step 4",)),
    # The imported model: here the tiny pretrained run stands in for runs/qwen.
    Rule("python -m llm_jax.main --config=configs/sft.py --workdir=runs/qwen-lora --config.init_from=runs/qwen "
         "--config.lora.rank=8 --config.lora.alpha=16 --config.lora.dropout=0.05 "
         "--config.lora.targets=q,k,v,o,gate,up,down --config.train.lr=2e-4 --config.data.train=my_chats.jsonl "
         "--config.model.dtype=bfloat16 --config.model.param_dtype=bfloat16", args=TINY,
         files=("my_chats.jsonl",), links=(("runs/qwen", "pre"),), outputs=("runs/qwen-lora/checkpoints/4",)),
    Rule("python -m llm_jax.convert.merge_lora --workdir=runs/qwen-lora --out=runs/qwen-lora-merged",
         outputs=("runs/qwen-lora-merged/config.json",)),
    # docs/data.md
    Rule("python -m llm_jax.main --config=configs/sft.py --workdir=runs/mine "
         "--config.data.train=chats.jsonl@0.7,alpaca.json@0.3 --config.data.eval=heldout.jsonl",
         args=TINY, files=("chats.jsonl", "alpaca.json", "heldout.jsonl"), outputs=("runs/mine/checkpoints/4",)),
    Rule("python -m llm_jax.data.inspect --config=configs/sft.py --config.data.train=alpaca.json --n=3",
         files=("alpaca.json",), expect=("--- record 2",)),
    Rule("python -m llm_jax.data.train_tokenizer --input=corpus.jsonl,more.txt --vocab_size=6400 --out=tok/",
         files=("corpus.jsonl", "more.txt"), outputs=("tok/tokenizer.model",)),
    Rule("python -m llm_jax.main --config=configs/pretrain.py --workdir=runs/pre-tok "
         "--config.data.tokenizer.path=tok/tokenizer.model", args=TINY, outputs=("runs/pre-tok/checkpoints/4",)),
    Rule("python -m llm_jax.data.prepare --config=configs/pretrain.py --out=data/corpus_tok",
         args=("--config.data.synthetic.n_entities=40", "--config.data.tokenizer.vocab_size=600"),
         outputs=("data/corpus_tok/manifest.json", "data/corpus_tok/tokenizer.model"),
         expect=("wrote data/corpus_tok",)),
    Rule("python -m llm_jax.main --config=configs/pretrain.py --workdir=runs/pre-store "
         "--config.data.train=tokens:data/corpus_tok", args=TINY, needs=("data/corpus_tok/manifest.json",),
         outputs=("runs/pre-store/checkpoints/4",)),
    Rule("python -m llm_jax.data.bench --path=../shared/data/zh_wiki/zh_wiki_paragraphs.jsonl --shard_records=300",
         skip="reads ../shared/data (benchmark text a clone does not have); the builtin:bios bench rule runs "
              "the same code"),
    # docs/synth.md
    Rule(r"python -m llm_jax\.data\.synth --docs=wiki\.jsonl .*", regex=True,
         skip="needs an OpenAI-compatible LLM server; tests/test_synth_e2e.py runs it against a scripted one"),
    Rule("python -m llm_jax.main --config=configs/sft.py --workdir=runs/wiki-sft "
         "--config.data.train=qa.train.jsonl --config.data.eval=qa.val.jsonl", args=TINY,
         files=("qa.train.jsonl", "qa.val.jsonl"), outputs=("runs/wiki-sft/checkpoints/4",)),
    # docs/eval.md
    Rule("python -m llm_jax.main --config=configs/eval.py --workdir=runs/sft --config.eval.steps=all "
         "--config.eval.tasks=loss,rouge,repetition,knowledge,choice", args=TINY_EVAL,
         outputs=("runs/sft/eval_20.json", "runs/sft/eval_44.json", "runs/sft/eval/summary.md")),
    Rule("python -m llm_jax.main --config=configs/eval.py --workdir=runs/sft --config.eval.tasks=rouge,choice "
         "--config.eval.references=my_eval.jsonl --config.eval.rouge_tokenizer=char "
         "--config.eval.choice_file=ceval_val.csv --config.eval.choice_dev=ceval_dev.csv "
         "--config.eval.choice_shots=5", args=TINY_EVAL, files=("my_eval.jsonl", "ceval_val.csv", "ceval_dev.csv")),
    # Two runs the user trained: here the quick-start run under both names.
    Rule("python -m llm_jax.eval.compare --runs=runs/a,runs/b --metrics=knowledge.qa_heldout.contains --out=cmp",
         links=(("runs/a", "sft"), ("runs/b", "sft")), outputs=("cmp.md", "cmp.csv"),
         expect=("written: ", "cmp.md, ")),
    # lm-evaluation-harness through the server
    Rule(r"OPENAI_API_KEY=secret lm_eval .*", regex=True,
         skip="needs a running server and the user's task directory; tests/test_serve_lmeval.py runs lm_eval"),
    # docs/huggingface.md (its hf_import command is also in docs/post_training.md)
    Rule(r"python -m llm_jax\.convert\.hf_import --hf_dir=/models/Qwen2\.5-0\.5B-Instruct --workdir=runs/qwen",
         regex=True, skip="needs a Hugging Face checkpoint the user downloaded; tests/test_convert_import.py "
                          "imports tiny transformers models"),
    # The imported model: here the tiny pretrained run stands in for runs/qwen.
    Rule("python -m llm_jax.main --config=configs/sft.py --workdir=runs/qwen-sft --config.init_from=runs/qwen "
         "--config.data.train=my_chats.jsonl --config.model.dtype=bfloat16", args=TINY,
         files=("my_chats.jsonl",), links=(("runs/qwen", "pre"),), outputs=("runs/qwen-sft/checkpoints/4",)),
    Rule("python -m llm_jax.convert.hf_export --workdir=runs/sft --out=export/sft-hf",
         outputs=("export/sft-hf/config.json",)),
    Rule("python -m llm_jax.convert.peft_export --workdir=runs/qwen-lora --out=export/qwen-lora",
         outputs=("export/qwen-lora/adapter/adapter_config.json",)),
    # docs/gguf.md
    Rule("python -m llm_jax.convert.gguf_export --workdir=runs/sft --out=export/sft-q8_0.gguf --type=q8_0",
         outputs=("export/sft-q8_0.gguf", "export/Modelfile"), expect=("type q8_0",)),
    Rule("ollama create sft -f export/Modelfile", skip="ollama not installed"),
    Rule("ollama run sft", skip="ollama not installed"),
    Rule("python -m llm_jax.convert.bench_gguf --workdir=runs/sft", expect=("| q4_0 |",)),
    Rule("python -m llm_jax.convert.bench_gguf --workdir=runs/sft --split=train",
         expect=("| q4_0 |", "(builtin:bios_qa_train)")),
    # docs/scaling.md: several devices and hosts; virtual CPU devices stand in for the GPUs.
    Rule("python -m llm_jax.main --config=configs/pretrain.py --workdir=runs/pre-fsdp --config.mesh.fsdp=8 "
         "--config.mesh.data=1 --config.model.dtype=bfloat16", args=TINY, env=EIGHT_DEVICES,
         outputs=("runs/pre-fsdp/checkpoints/4",), expect=("'fsdp': 8",)),
    Rule("launch/local_multiprocess.sh 2 --config=configs/sft.py --workdir=runs/mp", args=TINY,
         outputs=("runs/mp/checkpoints/4",)),
    Rule(r"python -m llm_jax\.train\.bench --config=configs/pretrain\.py --compile_only --config\.data\.seq_len=32768 .*",
         regex=True, expect=("XLA buffers",)),
    Rule("python -m llm_jax.plan --config=configs/pretrain.py:qwen2-0.5b --devices=8xH100 "
         "--config.model.vocab_size=151936 --config.data.seq_len=4096 --config.data.batch_size=64",
         expect=("run with",)),
    Rule(r"launch/tpu_pod\.sh .* --dry_run -- .*", regex=True, expect=("queued-resources create",)),
    Rule(r"sbatch .*", regex=True,
         skip="needs a SLURM cluster; tests/test_launch.py runs the scripts against a fake sbatch/srun"),
    # docs/models.md: mixture of experts
    Rule("python -m llm_jax.main --config=configs/pretrain.py:minimind-moe --workdir=runs/moe "
         "--config.data.tokenizer.vocab_size=6400", args=TINY + SMALL_MODEL, outputs=("runs/moe/checkpoints/4",)),
    Rule("python -m llm_jax.main --config=configs/pretrain.py --workdir=runs/moe2 --config.model.moe.n_experts=8 "
         "--config.model.moe.expert_mlp_dim=256 --config.model.moe.every=2", args=TINY,
         outputs=("runs/moe2/checkpoints/4",)),
    Rule("python -m llm_jax.main --config=configs/pretrain.py:minimind-moe --workdir=runs/moe-ep "
         "--config.mesh.expert=4 --config.mesh.data=-1", args=TINY + SMALL_MODEL, env=EIGHT_DEVICES,
         outputs=("runs/moe-ep/checkpoints/4",), expect=("'expert': 4",)),
    # docs/benchmarks.md: one timed step, the heavy presets with one layer.
    Rule(r"python -m llm_jax\.train\.bench --config=configs/pretrain\.py:minimind-(26m|moe) "
         r"--config\.model\.vocab_size=6400 --steps=5", regex=True, args=("--steps=1",) + SMALL_MODEL),
    Rule("python -m llm_jax.train.bench --config=configs/pretrain.py --steps=20", args=("--steps=1",)),
    Rule("python -m llm_jax.train.bench --config=configs/pretrain.py --config.model.dim=512 --config.model.n_layers=8",
         args=("--steps=1", "--config.model.n_layers=1")),
    Rule("python -m llm_jax.data.bench --path=builtin:bios", args=("--steps=2", "--seq_len=128", "--batch_size=4",
                                                                  "--prepare_workers=2"),
         expect=("token store: 2 batches",)),
    Rule("python -m llm_jax.infer.bench", args=("--batch_sizes=1", "--prompt_len=8", "--new_tokens=4")),
    Rule("python -m llm_jax.train.bench --shape=minimind-26m --compare_torch --steps=6",
         args=("--steps=1", "--rounds=1"), expect=("ratio",)),
    Rule("python -m llm_jax.train.bench --shape=nanogpt-cpu --compare_torch --steps=30",
         args=("--steps=1", "--rounds=1"), expect=("ratio",)),
    Rule("python -m llm_jax.train.bench --suite=gpu",
         skip="needs a GPU (an H100: under 8 minutes); tests/test_gpu_suite.py runs the suite with --tiny "
              "on the CPU"),
    Rule("launch/gpu_suite.sh --download", skip="downloads wheels (needs the network)"),
    Rule("launch/gpu_suite.sh", skip="needs a GPU machine; the suite itself runs with --tiny below"),
    Rule("python -m llm_jax.train.bench --suite=gpu --tiny --suite_dir=runs/gpu_suite_tiny",
         outputs=("runs/gpu_suite_tiny/results.json",), expect=("| measurement | result |",)),
    Rule("python -m llm_jax.infer.bench --compare_torch",
         args=("--dim=64", "--n_layers=1", "--repeats=1", "--batch_sizes=1", "--prompt_len=8", "--new_tokens=4")),
    Rule("python -m llm_jax.infer.bench --compare_torch --repeats=5",
         args=("--dim=64", "--n_layers=1", "--repeats=1", "--batch_sizes=1", "--prompt_len=8", "--new_tokens=4")),
    Rule("python -m llm_jax.model.bench_matmul", args=("--dim=64", "--mlp_dim=128", "--tokens=64"),
         expect=("JAX/torch 1",)),
    Rule("python -m llm_jax.serve.bench",
         args=("--models=tiny", "--clients=1", "--requests_per_client=1", "--min_requests=1", "--max_tokens=4",
               "--slots=2", "--seq_len=64")),
    # docs/experiments.md
    Rule("bash docs/experiments/repetition.sh",
         skip="an experiment of several training runs and evals (docs/experiments.md gives its CPU time); "
              "it runs the training and eval jobs the other pages' commands run"),
    Rule("bash docs/experiments/knowledge.sh",
         skip="an experiment of several training runs and evals (docs/experiments.md gives its CPU time); "
              "it runs the training and eval jobs the other pages' commands run"),
]


def _tokens(command: str) -> list[str]:
  lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
  lexer.whitespace_split = True
  lexer.commenters = "#"
  return list(lexer)


def readme_commands(text: str) -> list[tuple[int, str]]:
  """(line, command) of every ```bash block's commands; continuations joined, comments dropped."""
  commands, block, pending = [], False, []
  for number, line in enumerate(text.split("\n"), 1):
    stripped = line.strip()
    if not block:
      block = stripped == "```bash"
      continue
    if stripped.startswith("```"):
      block = False
      continue
    pending.append((number, stripped))
    if stripped.endswith("\\"):
      continue
    first = pending[0][0]
    joined = " ".join(s[:-1] if s.endswith("\\") else s for _, s in pending)
    pending = []
    tokens = _tokens(joined)
    if tokens:
      commands.append((first, " ".join(tokens)))
  return commands


def page_commands() -> list[tuple[str, str]]:
  """(page:line, command) of every page of `PAGES`, in that order."""
  commands = []
  for page in PAGES:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
      commands += [(f"{page}:{line}", command) for line, command in readme_commands(f.read())]
  return commands


def _rule(command: str) -> Rule:
  found = [r for r in RULES if r.matches(command)]
  assert found, f"documented command not covered by tests/test_readme.py: {command}"
  assert len(found) == 1, f"documented command matches {len(found)} rules of tests/test_readme.py: {command}"
  return found[0]


def _shell_line(command: str, args: tuple[str, ...]) -> str:
  """The command with `args` appended to its first simple command, as one bash line."""
  tokens = _tokens(command)
  end = next((i for i, t in enumerate(tokens) if t in (";", "&&", "||", "|")), len(tokens))
  tokens[end:end] = list(args)
  return " ".join(t if t in (";", "&&", "||", "|") else shlex.quote(t) for t in tokens)


@pytest.fixture(name="clone")
def _clone(tmp_path):
  """A directory laid out like the repository's root (configs/, launch/), where runs/ are made."""
  for name in ("configs", "launch"):
    os.symlink(os.path.join(ROOT, name), tmp_path / name)
  bin_dir = tmp_path / ".bin"  # `python` on PATH is this interpreter, as in the user's venv
  bin_dir.mkdir()
  shim = bin_dir / "python"  # a script, not a symlink: a venv's python finds its site-packages
  shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
  shim.chmod(0o755)
  return tmp_path


def _env(clone, extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             PATH=str(clone / ".bin") + os.pathsep + os.environ["PATH"])
  env.pop("XLA_FLAGS", None)
  env.update(extra or {})
  return env


def _run(clone, where: str, command: str, rule: Rule):
  for name in rule.files:
    path = clone / name
    if not path.exists():
      path.write_text(USER_FILES[name], encoding="utf-8")
  for link, target in rule.links:
    path = clone / link
    if not os.path.lexists(path):
      path.parent.mkdir(parents=True, exist_ok=True)
      os.symlink(target, path)
  shell = _shell_line(command, rule.args)
  start = time.time()
  if rule.server:
    _serve(clone, where, shell, rule)
    print(f"{where} ({time.time() - start:.0f} s): {shell}")
    return None
  out = subprocess.run(["bash", "-c", shell], cwd=clone, env=_env(clone, rule.env), text=True,
                       input=rule.stdin if rule.stdin is not None else "", capture_output=True,
                       timeout=rule.timeout, check=False)
  print(f"{where} ({time.time() - start:.0f} s): {shell}")
  assert out.returncode == 0, (f"{where}: `{shell}` exited {out.returncode}\n"
                               f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-5000:]}")
  for path in rule.outputs:
    assert os.path.exists(clone / path), f"{where}: `{shell}` wrote no {path}"
  for text in rule.expect:
    assert text in out.stdout + out.stderr, (f"{where}: `{shell}` printed no {text!r}\n"
                                             f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}")
  return out


def _serve(clone, where: str, shell: str, rule: Rule):
  """Starts the server, lists its models, gets one short chat answer from each, stops it with SIGINT."""
  key = next((t.split("=", 1)[1] for t in _tokens(shell) if t.startswith("--api_key=")), "")
  names = [t.split("=", 1)[1] for t in _tokens(shell) if t.startswith("--workdir=")]
  names = [n.split(":")[1] if ":" in n else os.path.basename(n) for n in names]
  proc = subprocess.Popen(["bash", "-c", "exec " + shell], cwd=clone, env=_env(clone, rule.env), text=True,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    url, printed = None, []
    deadline = time.time() + rule.timeout
    while url is None and time.time() < deadline:  # "  API:  http://127.0.0.1:PORT/v1  (...)"
      text = proc.stdout.readline()
      if not text:
        break
      printed.append(text)
      if text.strip().startswith("API:"):
        url = text.split()[1]
    assert url, f"{where}: `{shell}` never said where it serves:\n{''.join(printed)}{proc.stderr.read()}"
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}

    def ask(path, body=None):
      request = urllib.request.Request(url + path, headers=headers, method="POST" if body else "GET",
                                       data=json.dumps(body).encode() if body else None)
      with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)

    served = [m["id"] for m in ask("/models")["data"]]
    assert served == names, (served, names)
    for name in names:
      reply = ask("/chat/completions", {"model": name, "max_tokens": 4, "temperature": 0,
                                        "messages": [{"role": "user", "content": "你好"}]})
      assert reply["choices"][0]["message"]["role"] == "assistant", reply
  finally:
    proc.send_signal(signal.SIGINT)
    try:
      _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
      proc.kill()
      _, err = proc.communicate()
  assert proc.returncode == 0, f"{where}: `{shell}` exited {proc.returncode} on Ctrl-C:\n{err[-3000:]}"


def _walk(clone, quick_only: bool, checks=None) -> dict[str, subprocess.CompletedProcess]:
  """Runs the pages' commands in order; returns each run command's result by its text.

  `checks[command](result)` runs right after that command (before a later one changes its run).
  """
  results, deferred, skipped, failures = {}, [], [], []
  for line, command in page_commands():
    rule = _rule(command)  # every command, run or not, has a rule
    if rule.skip or (quick_only and (not rule.quick or command in results)):
      skipped.append((line, command, rule.skip))
      continue
    if not all(os.path.exists(clone / p) for p in rule.needs):
      deferred.append((line, command, rule))
      continue
    ready = [(line, command, rule)] + [d for d in deferred if all(os.path.exists(clone / p) for p in d[2].needs)]
    for item in ready:
      if item in deferred:
        deferred.remove(item)
      try:
        results[item[1]] = _run(clone, *item)
        if checks and item[1] in checks:
          checks.pop(item[1])(results[item[1]])
      except AssertionError as e:  # the whole walk goes on, to report every broken command at once
        if quick_only:
          raise
        failures.append(str(e))
  for line, command, reason in skipped:
    if reason:
      print(f"{line} skipped ({reason}): {command}")
  assert not deferred, f"commands whose inputs no documented command made: {deferred}"
  assert not failures, f"{len(failures)} documented command(s) failed:\n\n" + "\n\n".join(failures)
  assert not checks, f"checks of commands that were not run: {list(checks)}"
  return results


def test_every_docs_page_is_walked():
  """Every docs/*.md page is in `PAGES` (so its commands are walked), and every page listed exists."""
  pages = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))}
  missing = sorted(pages - set(PAGES))
  assert not missing, f"docs pages not in PAGES (add each in reading order): {missing}"
  gone = [p for p in PAGES if not os.path.exists(os.path.join(ROOT, p))]
  assert not gone, f"PAGES of tests/test_readme.py that do not exist: {gone}"
  assert PAGES[0] == "README.md" and len(set(PAGES)) == len(PAGES)


def test_every_readme_command_has_a_rule():
  commands = page_commands()
  assert len(commands) > 30
  for _, command in commands:
    _rule(command)
  used = {id(_rule(c)) for _, c in commands}
  stale = [r.command for r in RULES if id(r) not in used]
  assert not stale, f"rules of tests/test_readme.py no documented command uses any more: {stale}"


def _slug(heading: str) -> str:
  """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())  # a link's text only
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(text: str) -> set[str]:
  """The anchors of a page's headings (outside code blocks); repeated ones get -1, -2, ... as on GitHub."""
  seen, anchors, fence = {}, set(), False
  for line in text.split("\n"):
    if line.lstrip().startswith("```"):
      fence = not fence
    elif not fence and re.match(r"#{1,6} ", line):
      slug = _slug(line.lstrip("#"))
      anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
      seen[slug] = seen.get(slug, 0) + 1
  return anchors


def _links(text: str) -> list[tuple[int, str]]:
  """(line, target) of the page's Markdown links and images, outside code blocks and code spans."""
  links, fence = [], False
  for number, line in enumerate(text.split("\n"), 1):
    if line.lstrip().startswith("```"):
      fence = not fence
      continue
    if not fence:
      line = re.sub(r"`[^`]*`", "", line)
      links += [(number, m) for m in re.findall(r"\]\(([^)\s]+)\)", line)]
  return links


def test_doc_links():
  """Every relative link of the pages leads to a file of the repository, and its #anchor to a heading."""
  broken = []
  for page in PAGES:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
      text = f.read()
    for line, target in _links(text):
      if re.match(r"[a-z]+:", target):  # https:, mailto:
        continue
      path, _, anchor = target.partition("#")
      file = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path or os.path.basename(page)))
      if not os.path.exists(file) or not file.startswith(ROOT + os.sep):
        broken.append(f"{page}:{line}: {target} (no such file)")
      elif anchor:
        with open(file, encoding="utf-8") as f:
          if anchor not in _anchors(f.read()):
            broken.append(f"{page}:{line}: {target} (no such heading)")
  assert not broken, "broken links:\n" + "\n".join(broken)


def test_link_checker():
  text = ("# Quick start: fine-tune a chat model\n```bash\n# not a heading\n```\n## Pretrain, then fine-tune\n"
          "## Pretrain, then fine-tune\nsee [a](b.md#c) and ![img](x.png) but not `[d](e)`\n")
  assert _anchors(text) == {"quick-start-fine-tune-a-chat-model", "pretrain-then-fine-tune",
                            "pretrain-then-fine-tune-1"}
  assert _links(text) == [(7, "b.md#c"), (7, "x.png")]
  assert _slug("Notebooks (Colab)") == "notebooks-colab" and _slug("The `xla` path") == "the-xla-path"


def test_readme_parser():
  text = ("```bash\npip install x   # comment\n# a comment line\npython -m a --b=1 \\\n  --c=2\n```\n"
          "```python\nprint(1)\n```\n```bash\nuntil a; do sleep 1; done\n```\n")
  assert readme_commands(text) == [(2, "pip install x"), (4, "python -m a --b=1 --c=2"),
                                   (11, "until a ; do sleep 1 ; done")]
  assert _shell_line("until a --x ; do sleep 1 ; done", ("--y=1",)) == "until a --x --y=1 ; do sleep 1 ; done"


# absl's line prefix (`I1206 22:43:12.686666 139688333802368 writers.py:45] `): never on the console
# without --verbose
ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ", re.M)
SFT = "python -m llm_jax.main --config=configs/sft.py --workdir=runs/sft"
CHAT = "python -m llm_jax.chat --workdir=runs/sft"
CHAT_FILE = ("python -m llm_jax.chat --workdir=runs/sft --prompts=questions.txt --output=answers.jsonl "
             "--temperature=0")
EVAL = "python -m llm_jax.main --config=configs/eval.py --workdir=runs/sft"
RESUME = "until python -m llm_jax.main --config=configs/sft.py --workdir=runs/sft ; do sleep 1 ; done"


def test_readme_quick_start(clone):
  """Quick start as written (fewer steps): SFT, chat typed and from a file, eval, resume."""
  run = clone / "runs" / "sft"
  seen = {}

  def trained(out):
    log = out.stderr
    assert "compiling the train step (and running the first one): done in" in log
    assert "tokens/s" in log and "MFU" in log
    assert "checkpoint_manager.py" not in log  # library INFO chatter stays off the console
    # Clean lines as the README shows them (issue 24): no absl prefix, an ETA before the last step,
    # the eval saying what it scored
    assert not ABSL_PREFIX.search(log), log[:2000]
    assert re.search(r"^step 10/40 \| loss .* \| ETA \d", log, re.M), log[-3000:]
    assert re.search(r"^step 40/40 \| loss [^\n]*s/step(?! \| ETA)", log, re.M), log[-3000:]
    scored_line = re.search(r"^eval at step 40: loss [\d.]+ \| perplexity [\d.]+ \| accuracy "
                            r"[\d.]+ \(8 batches, ([\d,]+) documents, ([\d,]+) tokens\)$", log, re.M)
    assert scored_line, log[-3000:]
    seen["scored"] = scored_line.groups()
    assert sorted(os.listdir(run / "checkpoints"), key=int) == ["20", "40"]
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(run / "tensorboard"))
    final = json.load(open(run / "final_metrics.json"))
    first, last = final["eval_history"][0], final["eval_history"][-1]
    assert (first["step"], last["step"]) == (0, 40)
    assert last["eval_loss"] < first["eval_loss"] - 2.0, final["eval_history"]
    seen["eval_loss"] = last["eval_loss"]

  def chatted(out):  # three lines piped in: a question, /reset, a question; then EOF leaves
    assert "runs/sft: step 40" in out.stdout, out.stdout + out.stderr[-2000:]
    assert not ABSL_PREFIX.search(out.stderr), out.stderr[-2000:]
    assert out.stdout.count("\n> ") >= 3, out.stdout  # a prompt after each line

  def answered(out):
    del out
    answers = [json.loads(l) for l in open(clone / "answers.jsonl", encoding="utf-8")]
    assert len(answers) == 2 and all(isinstance(a["answer"], str) for a in answers), answers

  def scored(out):
    res = json.load(open(run / "eval_40.json"))
    # The eval job reads the checkpoint back and scores the same 8 held-out batches: the same
    # loss, documents and tokens as the training log's eval said, and its console says so too.
    assert abs(res["loss"] - seen["eval_loss"]) < 1e-4
    documents, tokens = seen["scored"]
    assert f"{res['documents']:,}" == documents and f"{res['tokens']:,.0f}" == tokens
    assert (f"(8 batches, {documents} documents, {tokens} tokens of builtin:bios_qa_heldout)"
            in out.stderr), out.stderr[-3000:]
    assert not ABSL_PREFIX.search(out.stderr), out.stderr[-2000:]
    assert abs(res["perplexity"] - math.exp(res["loss"])) < 1e-3 * res["perplexity"]
    assert 0 < res["accuracy"] < 1 and res["documents"] > 0
    assert res["doc_mean_loss"] > 0 and res["data"] == "builtin:bios_qa_heldout"

  def resumed(out):
    assert "Resumed from step 40" in out.stderr, out.stderr[-3000:]
    assert sorted(os.listdir(run / "checkpoints"), key=int)[-1] == "44"

  _walk(clone, quick_only=True, checks={SFT: trained, CHAT: chatted, CHAT_FILE: answered, EVAL: scored,
                                         RESUME: resumed})


@pytest.mark.slow
def test_readme_walk(clone):
  """Every command of the pages that can run on a CPU without the network, in the pages' order."""
  _walk(clone, quick_only=False)
