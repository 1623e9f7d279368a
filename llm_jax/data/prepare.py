"""Tokenize a config's training data once into a token store (llm_jax/data/store.py).

  python -m llm_jax.data.prepare --config=configs/pretrain.py --out=data/corpus_tok
  python -m llm_jax.data.prepare --config=configs/sft.py --config.data.train=chats.jsonl \
      --out=data/sft_tok --workers=8
  python -m llm_jax.main --config=configs/pretrain.py --config.data.train=tokens:data/corpus_tok

Reads config.data.train exactly as training does (any source: text, JSONL, JSON, .gz, Parquet,
ArrayRecord, globs, built-ins) and writes flat token shards, document offsets, loss weights (SFT)
and manifest.json, in `--workers` processes. The tokenizer is config.data.tokenizer.path, or one
trained on the corpus and kept in the store. Interrupted, the same command resumes (finished
shards are kept); on an unchanged corpus it does nothing; a changed tokenizer, setting or source
file is refused unless --rebuild. A bad record stops it with its file and line (or is skipped and
counted with --config.data.skip_bad_records=True).
"""

from absl import flags
from ml_collections import config_flags

from llm_jax import console, workdir_lock
from llm_jax.data import store_build

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/<job>.py file; override fields "
                                          "with --config.data.train=... etc.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Directory of the token store (created if missing).")
_WORKERS = flags.DEFINE_integer("workers", 0, "Tokenizing processes; 0 = one per CPU core.")
_SHARD = flags.DEFINE_integer("shard_records", 10_000, "Records per shard (the unit of work and "
                              "of resuming).")
_REBUILD = flags.DEFINE_bool("rebuild", False, "Replace a store made from other inputs.")


def main():
  with workdir_lock.hold(_OUT.value, hint="wait for the other prepare or use another --out"):
    store_build.prepare(_CONFIG.value, _OUT.value, workers=_WORKERS.value,
                        shard_records=_SHARD.value, rebuild=_REBUILD.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "out"])
  console.cli(main)
