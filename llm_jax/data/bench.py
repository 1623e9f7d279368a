"""Pipeline throughput on a real file (a benchmark, not a test).

  python -m llm_jax.data.bench --path=../shared/data/zh_wiki/zh_wiki_paragraphs.jsonl
  python -m llm_jax.data.bench --path=../shared/data/sft/sharegpt_zh_1k.jsonl --mode=sft \
      --seq_len=512 --skip_bad_records

Trains a tokenizer on the file first (unless --tokenizer names one), then pulls batches and
prints tokens/s (all block tokens, and real non-padding tokens) and the padding share.
"""

import time

from absl import flags

from configs import data as data_config
from llm_jax import console
from llm_jax.data import pipeline, tokenizer as tok_lib

_PATH = flags.DEFINE_string("path", "builtin:bios", "source spec to read")
_MODE = flags.DEFINE_enum("mode", "pretrain", ["pretrain", "sft"], "pretrain or sft")
_PACKING = flags.DEFINE_string("packing", "auto", "packing algorithm")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 1024, "tokens per block")
_BATCH = flags.DEFINE_integer("batch_size", 32, "rows per batch")
_STEPS = flags.DEFINE_integer("steps", 100, "batches to time (after 3 warm-up batches)")
_WORKERS = flags.DEFINE_integer("worker_count", 0, "grain worker processes")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "tokenizer path; '' trains one on the file")
_VOCAB = flags.DEFINE_integer("vocab_size", 6400, "vocab size when training a tokenizer")
_SKIP_BAD = flags.DEFINE_bool("skip_bad_records", False, "skip (and count) malformed records")


def main():
  cfg = data_config.get_config()
  cfg.train, cfg.mode, cfg.packing = _PATH.value, _MODE.value, _PACKING.value
  cfg.seq_len, cfg.batch_size, cfg.worker_count = _SEQ_LEN.value, _BATCH.value, _WORKERS.value
  cfg.tokenizer.path, cfg.tokenizer.vocab_size = _TOKENIZER.value, _VOCAB.value
  cfg.skip_bad_records = _SKIP_BAD.value
  cfg.tokenizer.train_max_sentences = 50_000
  start = time.perf_counter()
  tok = tok_lib.get_tokenizer(cfg.tokenizer, None, lambda: pipeline.corpus_texts(cfg))
  print(f"tokenizer ready in {time.perf_counter() - start:.1f}s: {tok_lib.summarize(tok)}")
  it = pipeline.make_train_iterator(cfg, tok, seed=0)
  for _ in range(3):  # warm-up: worker start, first reads
    next(it)
  total = real = 0
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    batch = next(it)
    total += batch["segment_ids"].size
    real += int((batch["segment_ids"] > 0).sum())
  seconds = time.perf_counter() - start
  print(f"{_STEPS.value} batches of {cfg.batch_size}x{cfg.seq_len} in {seconds:.2f}s: "
        f"{total / seconds:,.0f} tokens/s ({real / seconds:,.0f} non-padding tokens/s), "
        f"padding share {1 - real / total:.3f}")


if __name__ == "__main__":
  console.cli(main)
