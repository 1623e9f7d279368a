"""SentencePiece tokenizer: lossless round trips, ChatML specials, caching, loading, the CLI."""

import os
import pickle
import sys
import time
import types

import pytest

from configs import data as data_config
from configs import sft as sft_config
from llm_jax import config_check
from llm_jax.data import pipeline
from llm_jax.data import tokenizer as tok_lib
from llm_jax.data import train_tokenizer

CORPUS = [
    "李明宇于1965年3月12日出生在杭州。他毕业于东湖大学，主修物理学。",
    "臺灣的繁體中文與簡體中文不同。龍與龙是同一個字。",
    "The quick brown fox jumps over the lazy dog. Numbers like 3.14159 and 2024.",
    "def add(a, b):\n    return a + b  # adds two numbers",
    "Emoji make people happy 🙂🚀 and so do tabs\tand spaces.",
] * 20

MIXED = ("中文简体：北京欢迎你。繁體：臺灣龍鳳。English text, with punctuation! "
         "def f(x):\n\treturn {'k': [1, 2]}  # code\r\n"
         "emoji 🙂👍🏽🇨🇳 rare 𠀀 full-width ＡＢＣ１２３ ideographic\u3000space nbsp\u00a0 "
         "zero-width\u200bjoiner  double  spaces   and a literal ▁ meta char\n\n")


@pytest.fixture(scope="module")
def tok():
  return tok_lib.train_sentencepiece(CORPUS, vocab_size=400)


def test_round_trip_is_lossless_on_mixed_text(tok):
  ids = tok.encode(MIXED)
  assert tok.decode(ids) == MIXED
  # Characters never seen in training (𠀀, 👍🏽) still round-trip, through byte pieces.
  for text in ["𠀀", "👍🏽", "\t\t", "  ", "\u3000", "▁▁ ▁", "<|im_start|>", ""]:
    assert tok.decode(tok.encode(text)) == text, repr(text)


def test_special_tokens_are_single_ids(tok):
  ids = {tok.eos_id, tok.im_start_id, tok.im_end_id, tok.pad_id,
         tok.token_to_id("<think>"), tok.token_to_id("</think>")}
  assert len(ids) == 6 and all(0 <= i < tok.vocab_size for i in ids)
  assert tok.id_to_token(tok.im_start_id) == "<|im_start|>"
  # <think> in assistant text is one token; ChatML markers typed by a user are not special.
  assert tok.token_to_id("<think>") in tok.encode("a<think>b</think>c")
  assert tok.encode("<think>") == [tok.token_to_id("<think>")]
  typed = tok.encode("<|im_start|>user<|im_end|><|endoftext|>")
  assert not {tok.im_start_id, tok.im_end_id, tok.eos_id} & set(typed)
  # Specials decode as their text.
  assert tok.decode([tok.im_start_id] + tok.encode("user\nhi") + [tok.im_end_id, tok.eos_id]) \
      == "<|im_start|>user\nhi<|im_end|><|endoftext|>"


def test_digits_are_split(tok):
  pieces = [tok.id_to_token(i) for i in tok.encode("2024")]
  assert pieces == ["2", "0", "2", "4"]


def test_pickle_save_and_load(tok, tmp_path):
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode(MIXED) == tok.encode(MIXED)
  path = tok.save(str(tmp_path))
  loaded = tok_lib.Tokenizer.load(path)
  assert loaded.encode(MIXED) == tok.encode(MIXED) and loaded.vocab_size == tok.vocab_size


def test_get_tokenizer_trains_once_then_reuses_cache(tmp_path):
  cfg = data_config.get_config().tokenizer
  cfg.vocab_size = 400
  calls = []

  def corpus():
    calls.append(1)
    return iter(CORPUS)

  first = tok_lib.get_tokenizer(cfg, str(tmp_path), corpus)
  assert os.path.isfile(tmp_path / "tokenizer.model") and calls == [1]
  second = tok_lib.get_tokenizer(cfg, str(tmp_path), corpus)
  assert calls == [1]  # the cached model was reused, the corpus never read again
  assert second.encode(MIXED) == first.encode(MIXED)
  # An explicit .model path and a directory holding tokenizer.model load the same model.
  cfg.path = str(tmp_path / "tokenizer.model")
  assert tok_lib.get_tokenizer(cfg, None, corpus).encode(MIXED) == first.encode(MIXED)
  cfg.path = str(tmp_path)
  assert tok_lib.get_tokenizer(cfg, None, corpus).vocab_size == first.vocab_size


def test_get_tokenizer_dispatches_tokenizer_json_to_hf(tmp_path, monkeypatch):
  (tmp_path / "tokenizer.json").write_text("{}")
  fake = types.ModuleType("llm_jax.data.hf_tokenizer")
  fake.HFTokenizer = lambda path: ("hf", path)
  monkeypatch.setitem(sys.modules, "llm_jax.data.hf_tokenizer", fake)
  cfg = data_config.get_config().tokenizer
  cfg.path = str(tmp_path)
  assert tok_lib.get_tokenizer(cfg, None, lambda: []) == ("hf", str(tmp_path))
  cfg.path = str(tmp_path / "tokenizer.json")
  assert tok_lib.get_tokenizer(cfg, None, lambda: [])[0] == "hf"


def test_missing_model_file_and_empty_corpus_are_clear_errors(tmp_path):
  cfg = data_config.get_config().tokenizer
  cfg.path = str(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tok_lib.get_tokenizer(cfg, None, lambda: [])
  with pytest.raises(ValueError, match="corpus is empty"):
    tok_lib.train_sentencepiece(["", "  "], vocab_size=400)


def test_default_corpus_trains_fast_and_covers_chat(tmp_path):
  cfg = data_config.get_config()
  start = time.time()
  tok = tok_lib.get_tokenizer(cfg.tokenizer, str(tmp_path),
                                    lambda: pipeline.corpus_texts(cfg))
  assert time.time() - start < 15  # the contract with the trainer's default job
  assert tok.vocab_size <= cfg.tokenizer.vocab_size
  text = "<|im_start|>user\n韩晓出生于何时？<|im_end|>"
  assert tok.decode(tok.encode(text)) == text


def test_tokenizer_cli_and_the_retired_job(tmp_path, capsys):
  text_file = tmp_path / "a.txt"
  text_file.write_text("\n".join(CORPUS), encoding="utf-8")
  jsonl = tmp_path / "b.jsonl"
  jsonl.write_text('{"text": "一段中文文本。"}\n{"text": "more English text."}\n',
                   encoding="utf-8")
  tok = train_tokenizer.train(f"{text_file},{jsonl}", 450, str(tmp_path / "cli"))
  out = capsys.readouterr().out
  assert "vocab_size=" in out and "chars/token" in out and "round_trip_ok=True" in out
  assert os.path.isfile(tmp_path / "cli" / "tokenizer.model")
  assert tok.decode(tok.encode(MIXED)) == MIXED
  # config.job=tokenizer was a second copy of this command: it names the command now.
  config = sft_config.get_config()
  config.job = "tokenizer"
  with pytest.raises(ValueError, match="python -m llm_jax.data.train_tokenizer"):
    config_check.validate(config)


def test_saved_tokenizer_follows_the_umask(tmp_path):
  tok = tok_lib.train_sentencepiece([f"line {i} 你好" for i in range(100)], vocab_size=400)
  old = os.umask(0o022)
  try:
    path = tok.save(str(tmp_path))
  finally:
    os.umask(old)
  assert os.stat(path).st_mode & 0o777 == 0o644


def test_a_large_corpus_is_sampled_within_a_byte_budget_evenly_over_it(tmp_path, capsys):
  """The sample is bounded in bytes whatever the corpus size, covers the whole file (not its
  head), and the CLI says how much it read and how long it took."""
  import json
  n = 4000
  lines = [json.dumps({"text": f"第{i}段 part{i * 10 // n} " + "数据" * (20 + i % 50)},
                      ensure_ascii=False) for i in range(n)]
  path = tmp_path / "big.jsonl"
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  cfg = data_config.get_config()
  cfg.train = str(path)
  budget = 30_000  # of ~900 kB
  texts = list(pipeline.corpus_texts(cfg, max_bytes=budget))
  got = sum(len(t.encode()) for t in texts)
  assert budget * 0.9 <= got <= budget
  assert 60 < len(texts) < n // 10
  deciles = {t.split()[1] for t in texts}
  assert deciles == {f"part{d}" for d in range(10)}  # every tenth of the file, tail included
  # Without a binding byte budget the record budget still spreads the sample evenly.
  few = list(pipeline.corpus_texts(cfg, max_records=20, max_bytes=10 ** 12))
  assert len(few) == 20 and {t.split()[1] for t in few} == {f"part{d}" for d in range(10)}

  train_tokenizer.train(str(path), 300, str(tmp_path / "tok"), max_bytes=budget)
  out = capsys.readouterr().out
  assert f" bytes (budget {budget:,}) evenly over the corpus; read and trained in" in out
  sampled = int(out.split(" texts, ")[1].split(" bytes")[0].replace(",", ""))
  assert 0.9 * budget <= sampled <= budget
