"""Evaluates a run's checkpoints: `--workdir` is the run; data, model shape and tokenizer come from
its config.json, and every `--config.data.*` / `--config.eval.*` given here is applied on top.

  python -m llm_jax.main --config=configs/eval.py --workdir=runs/sft
  python -m llm_jax.main --config=configs/eval.py --workdir=runs/sft \\
    --config.eval.tasks=loss,rouge,repetition,knowledge,choice --config.eval.steps=all

Writes <workdir>/eval_<step>.json per checkpoint and, under <workdir>/eval/, summary.md,
summary.csv, plots/*.png (every headline metric against the step) and samples/ (the generated
answers, and the fixed chat prompts' answers side by side in chat_prompts.md).
"""

import ml_collections

from configs import base


def get_config(model=None):
  c = base.get_config(model)
  c.job = "eval"
  c.data.eval = ""  # "" scores the run's own eval data; or a source spec like data.train's
  c.eval = e = ml_collections.ConfigDict()
  e.tasks = "loss"  # comma list of: loss, rouge, repetition, knowledge, choice
  e.steps = ""  # which checkpoints: all | latest | 100,200,... ; "" = eval.step (-1: latest)
  e.step = -1  # the checkpoint when eval.steps is "": -1 is the latest
  e.split = "eval"  # which data source to score: eval (data.eval) | train (data.train)
  e.max_batches = 0  # loss: stop after this many batches; 0 is the whole set
  e.out_dir = ""  # where summary/plots/samples go; "" = <workdir>/eval (JSONs stay in workdir)
  e.batch_size = 32  # prompts generated, or rows scored, per call (a multiple of the batch shards)
  e.max_examples = 200  # rouge / repetition / choice: first N records of their sets; 0 = all
  e.max_new_tokens = 64  # longest generated answer (rouge, knowledge, chat prompts)
  e.references = ""  # rouge: SFT-format JSONL (last assistant turn = reference) or {"prompt", "reference"}; "" = data.eval
  e.rouge_tokenizer = "auto"  # auto (CJK chars, Latin words) | char | word | jieba
  e.rep_prefix = 50  # repetition on text: prefix tokens given to the model
  e.rep_continuation = 100  # repetition: tokens generated after the prefix (and longest chat answer)
  e.rep_n = 4  # n of seq-rep-n
  e.rep_windows = "16,32,128"  # l of rep/l: windows of previous ground-truth tokens
  e.loop_window = 32  # a continuation ends in a loop if its last N tokens repeat a pattern of <= N/2
  e.sample_temperature = 1.0  # repetition's sampled continuations: temperature
  e.sample_top_p = 0.9  # repetition's sampled continuations: nucleus mass
  e.chat_prompts = "builtin"  # fixed prompts answered at every checkpoint: builtin | a file (lines or JSONL) | "" = none
  e.probe = ""  # knowledge: your JSONL of {"question", "answer"}; "" = the embedded encyclopedia
  e.knowledge_people = 0  # knowledge: at most N people per (QA split, pretraining) group; 0 = all
  e.choice_file = "builtin:bios_choice"  # choice: CSV / JSONL (question, A-D, answer) or builtin:bios_choice
  e.choice_dev = ""  # choice: few-shot examples come from this file's first rows ("" = other questions)
  e.choice_shots = 0  # choice: solved examples before each question (0 = zero-shot)
  e.choice_style = "auto"  # choice: en (Answer:) | zh (答案：) | auto (zh if most questions are Chinese)
  e.choice_format = "letters"  # choice: letters (MMLU/C-Eval: score " A".." D") | cloze (score each choice's text)
  e.plots = True  # draw PNG plots (matplotlib, Agg)
  return c
