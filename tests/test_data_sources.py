"""Lazy record sources against json/pyarrow references, and every bad-input message."""

import json
import logging
import os

import numpy as np
import pytest

from configs import data as data_config
from llm_jax.data import pipeline
from llm_jax.data import sources
from llm_jax.data import tokenizer as tok_lib
from tests import resident

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
TRICKY = [
    {"text": "braces { } [ ] in a string", "n": 1},
    {"text": 'escaped \\" quote and backslash at end \\', "nested": {"a": [1, {"b": "}"}]}},
    {"text": "中文，emoji 🙂, newline\nand tab\t", "list": [[], {}]},
    {"text": "\\\\\"", "x": None},
]


def test_jsonl_index_reads_lazily_and_names_lines(tmp_path):
  path = tmp_path / "d.jsonl"
  lines = [json.dumps(r, ensure_ascii=False) for r in TRICKY]
  path.write_text(lines[0] + "\n\n  \n" + "\n".join(lines[1:]), encoding="utf-8")  # no final \n
  source = sources.open_file(str(path))
  assert isinstance(source, sources.JsonlSource) and len(source) == len(TRICKY)
  assert isinstance(source._starts, np.ndarray)  # an offset index, not parsed records
  assert [source[i] for i in range(len(source))] == TRICKY
  assert source.where(1) == f"{path}:4"  # blank lines skipped, numbering kept


@pytest.mark.parametrize("chunk", [7, 64, 1 << 22])
def test_json_array_index_matches_json_load(tmp_path, monkeypatch, chunk):
  monkeypatch.setattr(sources, "_CHUNK", chunk)  # small chunks exercise the carried state
  path = tmp_path / "a.json"
  path.write_text(json.dumps(TRICKY, ensure_ascii=False, indent=1), encoding="utf-8")
  source = sources.open_file(str(path))
  assert isinstance(source, sources.JsonArraySource)
  assert [source[i] for i in range(len(source))] == json.load(open(path, encoding="utf-8"))
  first_line = 1 + open(path, encoding="utf-8").read().count("\n", 0, int(source._starts[2]))
  assert source.where(2).startswith(f"{path}:{first_line} ")


def test_truncated_json_array_is_an_error(tmp_path):
  path = tmp_path / "cut.json"
  path.write_text(json.dumps(TRICKY)[:-10])
  with pytest.raises(sources.RecordError, match="not a complete JSON array"):
    sources.open_file(str(path))


def test_text_parquet_and_array_record_sources(tmp_path):
  text = tmp_path / "t.txt"
  text.write_text("line one\r\n\nline two 中文\n", encoding="utf-8")
  assert [sources.open_file(str(text))[i] for i in range(2)] == ["line one", "line two 中文"]

  import pyarrow as pa
  import pyarrow.parquet as pq
  rows = [{"text": f"row {i}", "id": i} for i in range(10)]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet", row_group_size=3)
  parquet = sources.open_file(str(tmp_path / "p.parquet"))
  assert len(parquet) == 10 and [parquet[i] for i in (9, 0, 4)] == [rows[9], rows[0], rows[4]]

  from array_record.python import array_record_module
  path = str(tmp_path / "r.array_record")
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for r in TRICKY[:2]:
    writer.write(json.dumps(r).encode())
  writer.write("plain text record".encode())
  writer.close()
  ar = sources.open_file(path)
  assert [ar[i] for i in range(3)] == TRICKY[:2] + ["plain text record"]


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data not present")
def test_real_files_alpaca_array_and_sharegpt():
  path = os.path.join(SHARED, "sft", "alpaca_zh_demo.json")
  source = sources.open_file(path)
  reference = json.load(open(path, encoding="utf-8"))
  assert len(source) == len(reference) and source[0] == reference[0]
  assert source[len(reference) - 1] == reference[-1]
  cfg = data_config.get_config()
  assert pipeline.DocReader(path, cfg).format == "alpaca"
  assert pipeline.DocReader(os.path.join(SHARED, "sft", "sharegpt_zh_1k.jsonl"),
                            cfg).format == "chat"


# ---- bad input: each case gives its message -------------------------------------------------

@pytest.fixture(scope="module")
def tok():
  return tok_lib.train_sentencepiece(["some text 中文 question answer"] * 20,
                                           vocab_size=400)


def _cfg(train, **kw):
  cfg = data_config.get_config()
  cfg.train, cfg.seq_len, cfg.batch_size = train, 32, 2
  cfg.update(kw)
  return cfg


def _batches(cfg, tok, n=2):
  it = pipeline.make_train_iterator(cfg, tok, seed=0)
  return [next(it) for _ in range(n)]


def test_malformed_json_line_names_file_and_line(tmp_path, tok):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "good one"}\n{"text": "broken\n{"text": "good two"}\n')
  with pytest.raises(sources.RecordError, match=rf"{path}:2: malformed JSON"):
    sources.open_file(str(path))[1]
  with pytest.raises(sources.RecordError, match=rf"{path}:2: malformed JSON"):
    _batches(_cfg(str(path), mode="pretrain"), tok, 20)


def test_skip_bad_records_skips_and_logs_count(tmp_path, tok, caplog):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "good one"}\n{"text": "broken\n{"text": "good two"}\n')
  cfg = _cfg(str(path), mode="pretrain", skip_bad_records=True, packing="none")
  with caplog.at_level(logging.WARNING):
    rows = [b["inputs"][r] for b in _batches(cfg, tok, 6) for r in range(2)]
  texts = {tok.decode(r[r > 0]) for r in rows}
  assert texts == {"good one", "good two"}
  assert any("bad records skipped" in m and f"{path}:2" in m for m in caplog.messages)


@pytest.mark.parametrize("content, match", [
    ('{"body": "x"}\n', r"cannot tell the record format"),
    ('{"messages": []}\n', r":1: the conversation under 'messages' is empty"),
    ('{"messages": [{"role": "wizard", "content": "x"}]}\n', r":1: messages\[0\] has unknown role"),
    ('{"messages": [{"role": "user", "content": "q"}]}\n', r":1: the conversation has no assistant"),
    ("", r"the dataset is empty"),
    ("\n  \n", r"the dataset is empty"),
])
def test_bad_inputs_give_clear_messages(tmp_path, tok, content, match):
  path = tmp_path / "d.jsonl"
  path.write_text(content)
  with pytest.raises((ValueError, sources.RecordError), match=match):
    _batches(_cfg(str(path)), tok)


def test_missing_field_names_field_file_and_line(tmp_path, tok):
  path = tmp_path / "d.jsonl"
  path.write_text('{"text": "ok"}\n{"content": "no text field"}\n')
  cfg = _cfg(str(path), mode="pretrain", packing="none", format="text")
  with pytest.raises(sources.RecordError, match=rf"{path}:2: the record has no field 'text'"):
    _batches(cfg, tok, 10)


def test_missing_file_unknown_builtin_bad_spec(tmp_path, tok):
  with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
    _batches(_cfg(str(tmp_path / "nowhere.jsonl")), tok)
  with pytest.raises(ValueError, match="unknown built-in source 'builtin:nope'"):
    _batches(_cfg("builtin:nope"), tok)
  with pytest.raises(ValueError, match="bad weight"):
    pipeline.parse_spec("a.jsonl@heavy")
  with pytest.raises(ValueError, match="is empty"):
    pipeline.parse_spec(" , ")
  assert pipeline.parse_spec("a.jsonl@2, builtin:bios") == [
      pipeline.SourceSpec("a.jsonl", 2.0), pipeline.SourceSpec("builtin:bios", 1.0)]


def test_tfds_source_reads_a_locally_prepared_dataset(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(5):
        yield i, {"text": f"文本 {i}"}

  TinyText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  cfg = data_config.get_config()
  cfg.tfds_data_dir = str(tmp_path)
  reader = pipeline.DocReader("tfds:tiny_text:train", cfg)
  assert reader.format == "text"
  assert sorted(reader[i]["text"] for i in range(len(reader))) == [f"文本 {i}" for i in range(5)]
  with pytest.raises(FileNotFoundError, match="tfds:not_prepared_here:train"):
    pipeline.DocReader("tfds:not_prepared_here:train", cfg)


def test_gzip_files_are_read_and_errors_name_the_gz(tmp_path, monkeypatch):
  import gzip
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  path = tmp_path / "pairs.jsonl.gz"
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write('{"text": "一"}\n{"text": "broken\n{"text": "三"}\n')
  source = sources.open_file(str(path))
  assert len(source) == 3 and source[2] == {"text": "三"}
  with pytest.raises(sources.RecordError, match=rf"{path}:2: malformed JSON"):
    source[1]


@pytest.mark.parametrize("name, content, match", [
    ("gbk.jsonl", '{"text": "中文"}\n'.encode("gbk"), r"gbk.jsonl:1: not UTF-8 text .*iconv"),
    ("pretty.json", b'{\n  "text": "x"\n}\n', r"pretty.json:1: one JSON object spread over several lines"),
    ("wrapped.json", b'{"data": [{"text": "x"}]}', r"wrapped.json:1: .*records are under 'data'"),
])
def test_bad_files_fail_at_open_with_one_line(tmp_path, name, content, match):
  path = tmp_path / name
  path.write_bytes(content)
  with pytest.raises(ValueError, match=match):
    sources.open_file(str(path))


def test_a_directory_is_not_a_data_file(tmp_path):
  with pytest.raises(ValueError, match=r"is a directory; name the files in it"):
    sources.open_file(str(tmp_path))


def test_skip_bad_records_counts_each_bad_line_once(tmp_path, tok, caplog):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "good one"}\n{"text": "broken\n{"text": "good two"}\n')
  cfg = _cfg(str(path), mode="pretrain", skip_bad_records=True, packing="none")
  with caplog.at_level(logging.WARNING):
    _batches(cfg, tok, 12)  # several epochs over the 3-line file
  counts = [m for m in caplog.messages if "bad records skipped" in m]
  assert counts and all("(1 so far)" in m for m in counts)


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux /proc")
@pytest.mark.parametrize("kind", ["jsonl", "json"])
def test_indexing_a_large_file_holds_a_chunk_of_it_resident(tmp_path, monkeypatch, kind):
  """The scan of a file drops the pages it has read: a 2 GB corpus is indexed at the resident
  memory of a small one (the pages stay in the page cache, not in the process)."""
  monkeypatch.setattr(sources, "_CHUNK", 1 << 20)
  record = json.dumps({"text": "数据" * 300}, ensure_ascii=False)
  n = (12 << 20) // len(record.encode())
  path = tmp_path / f"big.{kind}"
  path.write_text("\n".join([record] * n) + "\n" if kind == "jsonl" else
                  "[" + ",\n".join([record] * n) + "]", encoding="utf-8")
  peaks = []
  real = sources._unmap_scanned  # pylint: disable=protected-access

  def unmap(mm, start):
    if start // sources._CHUNK % 3 == 2:  # pylint: disable=protected-access
      peaks.append(resident.mapped_kib(str(path)))  # before this chunk is dropped: the peak
    real(mm, start)
  monkeypatch.setattr(sources, "_unmap_scanned", unmap)
  source = sources.open_file(str(path))
  assert len(source) == n and source[n - 1]["text"] == "数据" * 300
  assert len(peaks) >= 3 and max(peaks) <= 2 * 1024, peaks  # the chunk (1 MiB) and a page
