r"""Generate SFT question-answer chats from documents through an OpenAI-compatible endpoint.

  python -m llm_jax.data.synth --docs=docs.jsonl --base_url=http://127.0.0.1:8000/v1 \
      --model=NAME --out=qa.jsonl [--lang=auto|zh|en] [--paraphrases=2] [--judge] \
      [--split_by=document]

Writes OpenAI-messages JSONL (`configs/sft.py` reads it as is) with the source document and
chunk in "metadata", a ledger beside it (rerun the same command to resume), and a summary.
One run writes an --out at a time: a second one is refused with a line naming the first (its
pid, host and command) and exit status 75, before it reads or cuts anything.
The logic lives in llm_jax/data/synth/run.py.
"""

import os
import signal
import sys

from absl import flags

from llm_jax import console, workdir_lock
from llm_jax.data.synth import client as client_lib, documents, ledger, run as run_lib, validate

# Documents and chunks
_DOCS = flags.DEFINE_list("docs", None,
                          "Document files (comma separated; globs allowed): .txt lines, {text} "
                          "JSONL/JSON/Parquet, as the training readers read them.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text",
                                  "Field holding the text in JSON/Parquet records.")
_DOC_ID_FIELD = flags.DEFINE_string("doc_id_field", "",
                                    "Field naming a record's document (e.g. title): records "
                                    "sharing it are one document for --split_by; '' = each record "
                                    "is a document.")
_CLEAN = flags.DEFINE_bool("clean", True, "Drop wiki/HTML markup and empty brackets (clean_text).")
_SKIP_BAD = flags.DEFINE_bool("skip_bad_records", False,
                              "Skip (and count) malformed records instead of stopping.")
_MAX_DOCS = flags.DEFINE_integer("max_docs", 0,
                                 "Use only the first N documents (try a small run first); 0 = all.")
_CHUNK_UNIT = flags.DEFINE_enum("chunk_unit", "chars", ["chars", "tokens"],
                                "Unit of --chunk_size/--chunk_overlap.")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 2000,
                                   "Largest chunk, in --chunk_unit (chunks end at sentence ends).")
_CHUNK_OVERLAP = flags.DEFINE_integer("chunk_overlap", 200,
                                      "Trailing sentences repeated at the start of the next chunk,"
                                      " in --chunk_unit.")
_SENTENCE_ENDS = flags.DEFINE_string("sentence_ends", "。！？.!?", "Characters a sentence ends with.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "",
                                 "With --chunk_unit=tokens: a .model, a tokenizer.json or a "
                                 "directory with one.")
# Endpoint
_BASE_URL = flags.DEFINE_string("base_url", None,
                                "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1.")
_MODEL = flags.DEFINE_string("model", None, "Model name the server serves.")
_API_KEY_ENV = flags.DEFINE_string("api_key_env", "OPENAI_API_KEY",
                                   "Environment variable holding the API key (local servers "
                                   "usually need none).")
_CONCURRENCY = flags.DEFINE_integer("concurrency", 4, "Requests in flight at once.")
_TIMEOUT = flags.DEFINE_float("timeout", 120.0,
                              "Seconds before a request times out (then it is retried).")
_MAX_RETRIES = flags.DEFINE_integer("max_retries", 5,
                                    "Retries of a request after timeouts, 429 and 5xx (never 400).")
_BACKOFF = flags.DEFINE_float("backoff", 1.0,
                              "First retry waits about this many seconds, doubling each time, plus"
                              " jitter.")
_MAX_BACKOFF = flags.DEFINE_float("max_backoff", 60.0,
                                  "Longest wait between retries (Retry-After included).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.7,
                                  "Sampling temperature of the generating model.")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 2048, "Longest reply in tokens.")
_SEED = flags.DEFINE_integer("seed", -1,
                             "Sampling seed sent to the server (vLLM, llama.cpp); -1 = none.")
# What to ask and what to keep
_LANG = flags.DEFINE_enum("lang", "auto", ["auto", "zh", "en"],
                          "Prompt language; auto picks per chunk from its text.")
_PAIRS = flags.DEFINE_integer("pairs_per_chunk", 5, "Question-answer pairs asked for per chunk.")
_QA_PROMPT = flags.DEFINE_string("qa_prompt", "",
                                 "Template file for the QA request ({lang} in the name = one file "
                                 "per language); needs {chunk} and {n}. '' = built-in.")
_PARA_PROMPT = flags.DEFINE_string("paraphrase_prompt", "",
                                   "Template file for rephrasings; needs {questions} and {k}.")
_JUDGE_PROMPT = flags.DEFINE_string("judge_prompt", "",
                                    "Template file for the judge; needs {chunk} and {pairs}.")
_PARSE_RETRIES = flags.DEFINE_integer("parse_retries", 1,
                                      "Ask again this many times when a reply is not readable "
                                      "JSON.")
_MIN_GROUNDING = flags.DEFINE_float("min_grounding", 0.6,
                                    "Keep an answer only if this share of its words (CJK: "
                                    "character pairs) occurs in the chunk.")
_MIN_Q = flags.DEFINE_integer("min_question_chars", 4, "Shortest question kept, in characters.")
_MAX_Q = flags.DEFINE_integer("max_question_chars", 300, "Longest question kept, in characters.")
_MIN_A = flags.DEFINE_integer("min_answer_chars", 1, "Shortest answer kept, in characters.")
_MAX_A = flags.DEFINE_integer("max_answer_chars", 1000, "Longest answer kept, in characters.")
_JUDGE = flags.DEFINE_bool("judge", False,
                           "Ask an LLM judge to score each pair 1-10 and keep those >= "
                           "--judge_threshold.")
_JUDGE_MODEL = flags.DEFINE_string("judge_model", "",
                                   "Judge model on the same endpoint; '' = --model.")
_JUDGE_THRESHOLD = flags.DEFINE_float("judge_threshold", 7.0, "Lowest judge score kept.")
_PARAPHRASES = flags.DEFINE_integer("paraphrases", 0,
                                    "Rephrasings asked for per kept question (same answer).")
# Output
_OUT = flags.DEFINE_string("out", None,
                           "Output JSONL (with --split_by=document: OUT.train.jsonl and "
                           "OUT.val.jsonl).")
_SPLIT_BY = flags.DEFINE_enum("split_by", "none", ["none", "document"],
                              "document: train/val files, every document's questions in one of "
                              "them only.")
_VAL_FRACTION = flags.DEFINE_float("val_fraction", 0.1,
                                   "Share of documents in the val file (by a hash of the document "
                                   "id).")
_SPLIT_SEED = flags.DEFINE_integer("split_seed", 0, "Seed of the train/val document hash.")
_SYSTEM = flags.DEFINE_string("system", "", "System turn opening every written chat; '' = none.")
_RETRY_FAILED = flags.DEFINE_bool("retry_failed", False,
                                  "Also ask again for chunks the endpoint rejected (400) before.")
_FSYNC = flags.DEFINE_bool("fsync", True,
                           "fsync the output before each ledger line (safe against power cuts).")
flags.mark_flags_as_required(["docs", "base_url", "model", "out"])

_USER_ERRORS = (ValueError, FileNotFoundError, documents.DocumentError, ledger.LedgerError,
                client_lib.EndpointError, workdir_lock.Busy)  # Busy: exit status 75


def _config() -> run_lib.SynthConfig:
  api_key = os.environ.get(_API_KEY_ENV.value, "")
  if flags.FLAGS["api_key_env"].present and not api_key:
    raise ValueError(f"--api_key_env={_API_KEY_ENV.value}: that environment variable is not set.")
  return run_lib.SynthConfig(
      docs=documents.DocOptions(paths=tuple(_DOCS.value), text_field=_TEXT_FIELD.value,
                                doc_id_field=_DOC_ID_FIELD.value, clean=_CLEAN.value,
                                skip_bad_records=_SKIP_BAD.value, max_docs=_MAX_DOCS.value),
      chunks=documents.ChunkSpec(budget=_CHUNK_SIZE.value, overlap=_CHUNK_OVERLAP.value,
                                 sentence_ends=_SENTENCE_ENDS.value),
      endpoint=client_lib.EndpointConfig(
          base_url=_BASE_URL.value, model=_MODEL.value, api_key=api_key, timeout=_TIMEOUT.value,
          max_retries=_MAX_RETRIES.value, backoff=_BACKOFF.value, max_backoff=_MAX_BACKOFF.value,
          temperature=_TEMPERATURE.value, top_p=_TOP_P.value, max_tokens=_MAX_TOKENS.value,
          seed=None if _SEED.value < 0 else _SEED.value),
      out=_OUT.value, chunk_unit=_CHUNK_UNIT.value, tokenizer=_TOKENIZER.value, lang=_LANG.value,
      pairs_per_chunk=_PAIRS.value,
      limits=validate.Limits(min_question_chars=_MIN_Q.value, max_question_chars=_MAX_Q.value,
                             min_answer_chars=_MIN_A.value, max_answer_chars=_MAX_A.value,
                             min_grounding=_MIN_GROUNDING.value),
      parse_retries=_PARSE_RETRIES.value, judge=_JUDGE.value, judge_model=_JUDGE_MODEL.value,
      judge_threshold=_JUDGE_THRESHOLD.value, paraphrases=_PARAPHRASES.value,
      split_by=_SPLIT_BY.value, val_fraction=_VAL_FRACTION.value, split_seed=_SPLIT_SEED.value,
      system=_SYSTEM.value,
      prompt_files=tuple((k, v) for k, v in (("qa", _QA_PROMPT.value),
                                              ("paraphrase", _PARA_PROMPT.value),
                                              ("judge", _JUDGE_PROMPT.value)) if v),
      concurrency=_CONCURRENCY.value, retry_failed=_RETRY_FAILED.value, fsync=_FSYNC.value)


def _interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt  # SIGTERM (a preempted VM, `kill`) stops like Ctrl-C


def main():
  signal.signal(signal.SIGTERM, _interrupt)
  try:
    summary = run_lib.run(_config().validate())
  except KeyboardInterrupt:  # before the first request: nothing to save
    sys.stderr.write("interrupted before any request was sent\n")
    sys.exit(130)
  print(summary.format(), flush=True)
  if summary.stopped:
    sys.stderr.write(f"error: {summary.stopped}\n")
    sys.exit(2)
  if summary.interrupted:
    sys.stderr.flush()
    os._exit(130)  # worker threads may still wait on the network; their answers are dropped
  if summary.chunks_gave_up:
    sys.exit(3)  # some chunks are not done: a script can rerun until this is 0


if __name__ == "__main__":
  console.cli(main, user_errors=_USER_ERRORS, status=2)  # 2: a script's "fix the command"
