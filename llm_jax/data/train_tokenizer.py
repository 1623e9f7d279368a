"""Train a SentencePiece tokenizer from files.

  python -m llm_jax.data.train_tokenizer --input=a.txt,b.jsonl --vocab_size=6400 --out=dir

Inputs are any sources the pipeline reads (text, JSONL/JSON text or chat records, Parquet,
`builtin:bios`...); chats are rendered as ChatML text. Writes dir/tokenizer.model and prints
a summary (vocab size, chars per token on a mixed sample and on the corpus, special ids, the
bytes of text sampled and the time taken). At most --max_bytes of text (64 MB) is sampled, at
an even stride over each source, so memory stays bounded however large the corpus.
A training job with no `config.data.tokenizer.path` trains one the same way on its own data.
"""

import time

from absl import flags

from configs import data as data_config
from llm_jax import console
from llm_jax.data import pipeline, tokenizer as tok_lib

_INPUT = flags.DEFINE_string("input", None, "comma-separated sources (path or path@weight)",
                             required=True)
_VOCAB = flags.DEFINE_integer("vocab_size", 6400, "vocabulary size (minimind uses 6400)")
_OUT = flags.DEFINE_string("out", None, "output directory for tokenizer.model", required=True)
_MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "SentencePiece algorithm")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "field holding text in JSON records")
_MAX_SENTENCES = flags.DEFINE_integer("max_sentences", 500_000, "bound on training lines")
_MAX_BYTES = flags.DEFINE_integer("max_bytes", 64_000_000, "bound on the bytes of text sampled "
                                  "(evenly over the corpus; SentencePiece holds them in memory)")
_SKIP_BAD = flags.DEFINE_bool("skip_bad_records", False, "skip malformed records")


def train(inputs: str, vocab_size: int, out: str, *, model_type: str = "bpe",
          text_field: str = "text", max_sentences: int = 500_000, max_bytes: int = 64_000_000,
          skip_bad_records: bool = False) -> tok_lib.Tokenizer:
  cfg = data_config.get_config()
  cfg.train = inputs
  cfg.text_field = text_field
  cfg.skip_bad_records = skip_bad_records
  read = {"bytes": 0, "texts": 0}
  first = []  # 200 sampled records, for chars/token (a second pass would index the corpus again)

  def counted(texts):
    for t in texts:
      read["bytes"] += len(t.encode())
      read["texts"] += 1
      if len(first) < 200:
        first.append(t)
      yield t

  start = time.perf_counter()
  tok = tok_lib.train_sentencepiece(
      counted(pipeline.corpus_texts(cfg, max_records=max_sentences, max_bytes=max_bytes)),
      vocab_size=vocab_size, model_type=model_type, max_sentences=max_sentences)
  seconds = time.perf_counter() - start
  path = tok.save(out)
  sample = "\n".join(first)
  print(f"wrote {path}\n{tok_lib.summarize(tok)}\n"
        f"sampled {read['texts']:,} texts, {read['bytes']:,} bytes (budget {max_bytes:,}) "
        f"evenly over the corpus; read and trained in {seconds:.1f} s\n"
        f"chars/token on 200 corpus records: {len(sample) / max(len(tok.encode(sample)), 1):.2f}")
  return tok


def main():
  train(_INPUT.value, _VOCAB.value, _OUT.value, model_type=_MODEL_TYPE.value,
        text_field=_TEXT_FIELD.value, max_sentences=_MAX_SENTENCES.value,
        max_bytes=_MAX_BYTES.value, skip_bad_records=_SKIP_BAD.value)


if __name__ == "__main__":
  console.cli(main)
