"""Pipeline throughput on a real file (a benchmark, not a test).

  python -m llm_jax.data.bench --path=../shared/data/zh_wiki/zh_wiki_paragraphs.jsonl
  python -m llm_jax.data.bench --path=../shared/data/sft/sharegpt_zh_1k.jsonl --mode=sft \
      --seq_len=512 --skip_bad_records

Trains a tokenizer on the file first (unless --tokenizer names one), then pulls batches and
prints tokens/s (all block tokens, and real non-padding tokens) and the padding share: of the
on-the-fly pipeline, and side by side of a token store of the same data (prepared here with
--prepare_workers processes each, timed: input MB/s per worker count), whose batches are
checked equal to the on-the-fly ones first. --store=false times the on-the-fly pipeline only.

  python -m llm_jax.data.bench --path=../shared/data/zh_wiki/zh_wiki_paragraphs.jsonl \
      --prepare_workers=1,2 --store_dir=/tmp/zh_tok
"""

import shutil
import tempfile
import time

from absl import flags

from configs import data as data_config
from llm_jax import console
from llm_jax.data import pipeline, store_build, tokenizer as tok_lib

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
_STORE = flags.DEFINE_bool("store", True, "also prepare a token store and time it")
_STORE_DIR = flags.DEFINE_string("store_dir", "", "where to prepare it; '' = a temporary dir")
_PREP_WORKERS = flags.DEFINE_list("prepare_workers", ["1", "2"], "prepare with each count")
_SHARD = flags.DEFINE_integer("shard_records", 1000, "records per store shard")


class _Config:
  def __init__(self, data):
    self.data = data


def _time(it, steps: int) -> tuple[float, float, float]:
  """(tokens/s, non-padding tokens/s, padding share) over `steps` batches after 3 warm-up."""
  for _ in range(3):  # warm-up: worker start, first reads
    next(it)
  total = real = 0
  start = time.perf_counter()
  for _ in range(steps):
    batch = next(it)
    total += batch["segment_ids"].size
    real += int((batch["segment_ids"] > 0).sum())
  seconds = time.perf_counter() - start
  return total / seconds, real / seconds, 1 - real / total


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
  fly, fly_real, pad = _time(pipeline.make_train_iterator(cfg, tok, seed=0), _STEPS.value)
  print(f"on the fly: {_STEPS.value} batches of {cfg.batch_size}x{cfg.seq_len}: {fly:,.0f} "
        f"tokens/s ({fly_real:,.0f} non-padding tokens/s), padding share {pad:.3f}")
  if not _STORE.value:
    return
  out = _STORE_DIR.value or tempfile.mkdtemp(prefix="llm_jax_store_bench_")
  tok_dir = tempfile.mkdtemp(prefix="llm_jax_tok_")
  prep = cfg.copy_and_resolve_references()
  prep.tokenizer.path = tok.save(tok_dir) if isinstance(tok, tok_lib.Tokenizer) else cfg.tokenizer.path
  for workers in (int(w) for w in _PREP_WORKERS.value):
    shutil.rmtree(out, ignore_errors=True)
    report = store_build.prepare(_Config(prep), out, workers=workers,
                                 shard_records=_SHARD.value, quiet=True)
    print(f"prepare with {workers} worker(s): {report.records:,} records, {report.tokens:,} tokens "
          f"in {report.seconds:.1f}s: {report.input_bytes / 1e6 / report.seconds:.2f} MB/s of "
          f"input, {report.tokens / report.seconds:,.0f} tokens/s")
  scfg = prep.copy_and_resolve_references()
  scfg.train, scfg.worker_count = f"tokens:{out}", 0
  a, b = pipeline.make_train_iterator(cfg, tok, seed=0), pipeline.make_train_iterator(scfg, tok, seed=0)
  for _ in range(5):
    x, y = next(a), next(b)
    assert all((x[k] == y[k]).all() for k in x), "store batches differ from the on-the-fly ones"
  store, store_real, _ = _time(pipeline.make_train_iterator(scfg, tok, seed=0), _STEPS.value)
  print(f"token store: {_STEPS.value} batches of {cfg.batch_size}x{cfg.seq_len}: {store:,.0f} "
        f"tokens/s ({store_real:,.0f} non-padding tokens/s), the same batches: "
        f"{store / fly:.1f}x on the fly")
  if not _STORE_DIR.value:
    shutil.rmtree(out, ignore_errors=True)
  shutil.rmtree(tok_dir, ignore_errors=True)


if __name__ == "__main__":
  console.cli(main)
