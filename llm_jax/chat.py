"""Chat with a trained run in the terminal, continue plain text, or answer a file of prompts.

  python -m llm_jax.chat --workdir=runs/sft
  python -m llm_jax.chat --workdir=runs/pre --raw          # a pretrained run: plain-text completion
  python -m llm_jax.chat --workdir=runs/sft --prompts=questions.txt --output=answers.jsonl

--prompts: one prompt per line, or JSONL with {"prompt": ...} or {"messages": [{role, content}]}.
Prompt and answer are fitted into the run's context (what it was trained on); anything cut is
said. The logic lives in llm_jax/infer/session.py.
"""

import json


from absl import flags, logging
import jax

from llm_jax import console, rundir
from llm_jax.infer import reasoning, session as session_lib
from llm_jax.infer.generate import Generator
from llm_jax.infer.interrupt import Interrupts
from llm_jax.infer.sampling import SamplingConfig

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints/, config.json, tokenizer).")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step to load; -1 is the newest readable one.")
_RAW = flags.DEFINE_bool("raw", False, "Plain-text completion without the chat template (for "
                         "pretrained runs): each prompt is continued until <|endoftext|>.")
_SYSTEM = flags.DEFINE_string("system", "", "System prompt opening every conversation.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.7, "Sampling temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 is off.")
_TOP_P = flags.DEFINE_float("top_p", 0.9, "Nucleus sampling mass; 1 is off.")
_MIN_P = flags.DEFINE_float("min_p", 0.0, "Drop tokens below min_p * the top probability; 0 is off.")
_REP = flags.DEFINE_float("repetition_penalty", 1.1, "> 1 discourages repeating prompt/answer tokens.")
_PRESENCE = flags.DEFINE_float("presence_penalty", 0.0, "Subtracted from tokens already generated.")
_FREQUENCY = flags.DEFINE_float("frequency_penalty", 0.0, "Subtracted per occurrence of a generated token.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Longest answer in tokens (also capped by what "
                                "the context leaves after the prompt).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (same seed, same answers); each prompt of "
                            "--prompts draws its own stream, from the seed and its line's place.")
_STOP = flags.DEFINE_list("stop", [], "Extra stop strings (comma separated).")
_MAX_CONTEXT = flags.DEFINE_integer("max_context", 0, "Prompt + answer tokens at most; 0 = the run's "
                                    "context (the longest sequence its weights were trained on, "
                                    "or an imported model's max_position_embeddings).")
_PROMPTS = flags.DEFINE_string("prompts", "", "One-shot mode: file of prompts (text lines or JSONL).")
_OUTPUT = flags.DEFINE_string("output", "", "One-shot mode: JSONL file for the answers (default stdout).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "One-shot mode: prompts generated together.")
_SHOW_REASONING = flags.DEFINE_bool("show_reasoning", False, "Show the <think> reasoning before the "
                                    "answer (one-shot output always has it under \"reasoning\").")
flags.mark_flags_as_required(["workdir"])


def _sampling() -> SamplingConfig:
  return SamplingConfig(temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                        min_p=_MIN_P.value, repetition_penalty=_REP.value,
                        presence_penalty=_PRESENCE.value, frequency_penalty=_FREQUENCY.value,
                        max_new_tokens=_MAX_NEW.value, seed=_SEED.value).validate()


def run() -> None:
  sampling = _sampling()
  run = rundir.load(_WORKDIR.value, _STEP.value)
  context = _MAX_CONTEXT.value or run.context
  generator = Generator(run.params, run.model_cfg)
  if _PROMPTS.value:
    records = session_lib.read_prompts(_PROMPTS.value)
    answers = session_lib.answer_prompts(generator, run.tokenizer, records, sampling, system=_SYSTEM.value,
                                         stop_strings=_STOP.value, batch_size=_BATCH.value,
                                         context=context, raw=_RAW.value,
                                         warn=lambda m: logging.warning("%s: %s", _PROMPTS.value, m))
    answers = reasoning.split_answers(answers, _SHOW_REASONING.value)
    lines = "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers)
    if _OUTPUT.value:
      with open(_OUTPUT.value, "w", encoding="utf-8") as f:
        f.write(lines)
      logging.info("wrote %d answers to %s", len(answers), _OUTPUT.value)
    else:
      print(lines, end="")
    return
  if _RAW.value:
    session = session_lib.CompletionSession(generator, run.tokenizer, sampling, stop_strings=_STOP.value,
                                            context=context)
  else:
    session = session_lib.ChatSession(generator, run.tokenizer, sampling, system=_SYSTEM.value,
                                      stop_strings=_STOP.value, context=context)
  n_params = sum(x.size for x in jax.tree.leaves(run.params))
  print(f"{_WORKDIR.value}: step {run.step}, {n_params / 1e6:.1f}M parameters, context {context} "
        "tokens")
  interrupts = Interrupts().install()
  try:
    session_lib.interactive(reasoning.wrap_session(session, _SHOW_REASONING.value),
                     interrupts=interrupts)
  finally:
    interrupts.uninstall()


def main():
  run()


if __name__ == "__main__":
  console.cli(main)
