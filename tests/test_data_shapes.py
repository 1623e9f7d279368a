"""Real corpora as they ship (issue 25): Parquet read by many loader threads, .gz copies that are
said and cleaned, encodings checked through the whole file, byte order marks, and the public
record shapes (poetry paragraphs, role-less dialogues, TSV, hh-rlhf transcripts)."""

import json
import random
import threading

import numpy as np
import pytest

from llm_jax.data import sources


# ---- 1. Parquet shared by Grain's loader threads --------------------------------------------

def _parquet(path, n_rows, row_group_size):
  import pyarrow as pa
  import pyarrow.parquet as pq
  rows = [{"text": f"row {i} " + "字" * (i % 17), "id": i} for i in range(n_rows)]
  pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
  assert pq.ParquetFile(path).metadata.num_row_groups == -(-n_rows // row_group_size)
  return rows


@pytest.mark.parametrize("cache_bytes", [None, 1])  # 1: every group evicted at once
def test_parquet_read_by_16_threads_gives_exact_records(tmp_path, monkeypatch, cache_bytes):
  import pyarrow.parquet as pq
  path = str(tmp_path / "three_groups.parquet")
  rows = _parquet(path, 3 * 60, 60)
  decoded = []
  real = pq.ParquetFile.read_row_group

  def counting(self, i, *a, **kw):
    decoded.append(i)
    return real(self, i, *a, **kw)

  monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
  source = sources.open_file(path)
  if cache_bytes is not None:
    source.CACHE_BYTES = cache_bytes
  got, errors = {}, []
  start = threading.Barrier(16)

  def reader(seed):
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)  # as a shuffled dataset reads: groups interleaved
    try:
      start.wait()
      got[seed] = {i: source[i] for i in order}
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=reader, args=(k,)) for k in range(16)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert not errors and not any(t.is_alive() for t in threads)
  for seed in range(16):
    assert [got[seed][i] for i in range(len(rows))] == rows
  if cache_bytes is None:  # all three fit the cache: each decoded once, however many threads
    assert sorted(decoded) == [0, 1, 2]


# ---- 4. public record shapes as they ship ----------------------------------------------------

def _data_cfg(train, **kw):
  from configs import data as data_config
  cfg = data_config.get_config()
  cfg.train = train
  cfg.update(kw)
  return cfg


def _docs(path, **kw):
  from llm_jax.data import pipeline
  reader = pipeline.DocReader(str(path), _data_cfg(str(path), **kw))
  return reader, [reader[i] for i in range(len(reader))]


POEMS = [  # chinese-poetry's poet.tang.*.json: a JSON array, the poem's lines under "paragraphs"
    {"author": "李白", "paragraphs": ["床前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。"],
     "title": "靜夜思", "id": "a1"},
    {"author": "王之渙", "paragraphs": ["白日依山盡，黃河入海流。", "欲窮千里目，更上一層樓。"],
     "title": "登鸛雀樓", "id": "a2"},
]


def test_a_text_field_that_is_a_list_of_strings_is_joined_by_lines(tmp_path):
  path = tmp_path / "poet.tang.0.json"
  path.write_text(json.dumps(POEMS, ensure_ascii=False, indent=2), encoding="utf-8")
  reader, docs = _docs(path, text_field="paragraphs", mode="pretrain")
  assert reader.format == "text"
  assert [d["text"] for d in docs] == ["\n".join(p["paragraphs"]) for p in POEMS]
  path.write_text(json.dumps([{"paragraphs": ["一", 2]}]), encoding="utf-8")
  with pytest.raises(sources.RecordError, match=r"poet.tang.0.json:1 .*'paragraphs'\[1\] is a int"):
    _docs(path, text_field="paragraphs", format="text")


KDCONV = [  # KdConv's train.json: turns {"message", "attrs"?} without roles
    {"messages": [{"message": "你知道《战狼》吗？", "attrs": [{"attrname": "Information"}]},
                  {"message": "知道，是吴京导演的。"},
                  {"message": "它讲的是什么？"},
                  {"message": "讲一名特种兵的故事。"}], "name": "战狼"},
]


def test_dialogues_without_roles_alternate_when_asked(tmp_path):
  path = tmp_path / "kdconv.json"
  path.write_text(json.dumps(KDCONV, ensure_ascii=False), encoding="utf-8")
  with pytest.raises(sources.RecordError,
                     match=r"kdconv.json:1 .*messages\[0\] has no role .*data.roles=alternate"):
    _docs(path)
  reader, docs = _docs(path, roles="alternate")
  assert reader.format == "chat"
  assert docs[0]["messages"] == [
      {"role": r, "content": t["message"]}
      for r, t in zip(["user", "assistant", "user", "assistant"], KDCONV[0]["messages"])]
  # plain-string turns (LCCC-style), and a turn whose role contradicts the alternation
  path = tmp_path / "lccc.jsonl"
  path.write_text(json.dumps({"conversations": ["你好", "你好呀", "在干嘛"]}, ensure_ascii=False)
                  + "\n" + json.dumps({"messages": [{"role": "assistant", "content": "hi"}]})
                  + "\n", encoding="utf-8")
  reader, _ = _docs(path, roles="alternate", skip_bad_records=True)
  assert [m["role"] for m in reader[0]["messages"]] == ["user", "assistant", "user"]
  assert "says role 'assistant'" in reader[1]["error"] and f"{path}:2" in reader[1]["error"]


CSL = [  # CSL (Chinese scientific literature): title, abstract, keywords, discipline, category
    ["基于深度学习的图像识别方法", "本文提出一种新的卷积网络结构，在多个数据集上取得了较好的结果。",
     "深度学习_图像识别", "计算机科学与技术", "工学"],
    ["水稻产量的影响因素研究", "通过田间试验分析了施肥量与水稻产量的关系。", "水稻_产量", "作物学", "农学"],
]


@pytest.mark.parametrize("header", [True, False])
def test_tsv_files_read_with_their_header_or_named_columns(tmp_path, header):
  names = ["title", "abstract", "keywords", "discipline", "category"]
  lines = (["\t".join(names)] if header else []) + ["\t".join(r) for r in CSL]
  path = tmp_path / "csl_camera_readly.tsv"
  path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8") + b"\r\n")  # BOM, CRLF
  kw = {} if header else {"tsv_columns": ",".join(names)}
  reader, docs = _docs(path, rename_fields="abstract:instruction,title:output", **kw)
  assert reader.format == "alpaca"
  assert [d["messages"] for d in docs] == [
      [{"role": "user", "content": r[1]}, {"role": "assistant", "content": r[0]}] for r in CSL]
  raw = sources.open_file(str(path), **kw)
  assert raw[1] == dict(zip(names, CSL[1]))
  with open(path, "ab") as f:
    f.write("只有一列\n".encode("utf-8"))
  line = len(lines) + 1
  with pytest.raises(sources.RecordError, match=rf"csl_camera_readly.tsv:{line}: 1 tab-separated "
                     r"fields, but .* names 5 columns"):
    sources.open_file(str(path), **kw)[2]


HH = [  # Anthropic/hh-rlhf train.jsonl.gz: whole transcripts in chosen and rejected
    {"chosen": "\n\nHuman: What is the capital of France?\n\nAssistant: Paris.",
     "rejected": "\n\nHuman: What is the capital of France?\n\nAssistant: I don't know."},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit."
               "\n\nAssistant: An apple.\n\nIt is red.",
     "rejected": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit."
                 "\n\nAssistant: A carrot."},
]


def test_hh_rlhf_transcripts_become_prompt_and_responses(tmp_path, monkeypatch):
  import gzip
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  path = tmp_path / "train.jsonl.gz"
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in HH)
  reader, docs = _docs(path, mode="dpo")
  assert docs[0]["prompt"] == [{"role": "user", "content": "What is the capital of France?"}]
  assert docs[0]["chosen"] == [{"role": "assistant", "content": "Paris."}]
  assert docs[0]["rejected"] == [{"role": "assistant", "content": "I don't know."}]
  assert docs[1]["prompt"] == [{"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello! How can I help?"},
                               {"role": "user", "content": "Name a fruit."}]
  assert docs[1]["chosen"] == [{"role": "assistant", "content": "An apple.\n\nIt is red."}]
  # the split form (prompt ending in an empty "Assistant:" turn, then the two answers)
  from llm_jax.data import formats
  pair = formats.normalize_pair({"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello.",
                                 "rejected": " Go away."}, "f.jsonl:1")
  assert pair["prompt"] == [{"role": "user", "content": "Hi"}]
  assert pair["chosen"] == [{"role": "assistant", "content": " Hello."}]


@pytest.mark.parametrize("record, match", [
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "Go away."},
     r"the pair has no prompt .*mention 'Human:'.*hh-rlhf transcripts look like"),
    ({"chosen": "Note\n\nHuman: Hi\n\nAssistant: Hello.",
      "rejected": "\n\nHuman: Hi\n\nAssistant: Bye."},
     r"chosen looks like an hh-rlhf transcript but has text before its first turn"),
    ({"chosen": "\n\nHuman: Hi\n\nHuman: again\n\nAssistant: Hello.",
      "rejected": "\n\nHuman: Hi\n\nHuman: again\n\nAssistant: Bye."},
     r"turns 1 and 2 are both user turns"),
])
def test_unparseable_transcripts_say_the_format_is_the_cause(record, match):
  from llm_jax.data import formats
  with pytest.raises(sources.RecordError, match=rf"f.jsonl:3: .*{match}"):
    formats.normalize_pair(record, "f.jsonl:3")


# ---- 5. encoding through the whole file, byte order marks ------------------------------------

def _utf8_then_gbk(path, n_utf8_bytes, gbk_line):
  line = json.dumps({"text": "中文训练文本，" * 20}, ensure_ascii=False) + "\n"
  n = -(-n_utf8_bytes // len(line.encode("utf-8")))
  with open(path, "wb") as f:
    f.write(line.encode("utf-8") * n)
    f.write(gbk_line.encode("gbk") + b"\n")
    f.write(line.encode("utf-8") * 3)
  return n + 1  # the GBK line's number


@pytest.mark.parametrize("name", ["late.jsonl", "late.txt", "late.json"])
def test_gbk_after_megabytes_of_utf8_is_named_with_file_and_line(tmp_path, name):
  path = tmp_path / name
  gbk = '{"text": "这是GBK编码的一行"}' if name != "late.txt" else "这是GBK编码的一行"
  if name == "late.json":  # a JSON array: the GBK record inside it
    good = json.dumps({"text": "中文训练文本，" * 20}, ensure_ascii=False).encode("utf-8")
    n = -(-int(2.3e6) // (len(good) + 2))
    path.write_bytes(b"[\n" + b",\n".join([good] * n + [gbk.encode("gbk")]) + b"\n]\n")
    line = n + 2
  else:
    line = _utf8_then_gbk(path, int(2.3e6), gbk)
  assert path.stat().st_size > 2.3e6
  with pytest.raises(ValueError, match=rf"{path}:{line}: not UTF-8 text \(byte 0x.. at offset "
                     r"\d+\); convert the file to UTF-8, e.g. `iconv -f GBK -t UTF-8"):
    sources.open_file(str(path))
  # skip_bad_records: the job starts, says so, and the line is skipped with the same hint
  reader, _ = None, None
  from llm_jax.data import pipeline
  reader = pipeline.DocReader(str(path), _data_cfg(str(path), skip_bad_records=True,
                                                   mode="pretrain"))
  bad = [reader[i] for i in range(len(reader)) if "error" in reader[i]]
  assert len(bad) == 1 and f"{path}:{line}" in bad[0]["error"] and "iconv" in bad[0]["error"]


def test_characters_cut_by_the_scan_chunks_are_not_errors(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "_CHUNK", 7)  # every CJK character (3 bytes) straddles some cut
  path = tmp_path / "zh.txt"
  path.write_text("中文一行\n第二行，🙂\n", encoding="utf-8")
  assert [sources.open_file(str(path))[i] for i in range(2)] == ["中文一行", "第二行，🙂"]
  path.write_bytes("中文".encode("utf-8")[:-1])  # cut inside the last character
  with pytest.raises(ValueError, match=r"zh.txt:1: not UTF-8 text"):
    sources.open_file(str(path))


@pytest.mark.parametrize("name, content, expected", [
    ("bom.txt", "第一行\n第二行\n", ["第一行", "第二行"]),
    ("bom.jsonl", '{"text": "一"}\n{"text": "二"}\n', [{"text": "一"}, {"text": "二"}]),
    ("bom.json", '{"text": "一"}\n{"text": "二"}\n', [{"text": "一"}, {"text": "二"}]),
    ("bom_array.json", '[{"text": "一"}, {"text": "二"}]', [{"text": "一"}, {"text": "二"}]),
    ("bom_alone.txt", "\n第一行\n", ["第一行"]),  # a line holding only the mark is blank
])
def test_a_utf8_byte_order_mark_is_not_trained_on(tmp_path, name, content, expected):
  path = tmp_path / name
  path.write_bytes(b"\xef\xbb\xbf" + content.encode("utf-8"))
  source = sources.open_file(str(path))
  assert [source[i] for i in range(len(source))] == expected
  if "array" not in name:  # read_records: the small JSON Lines / text files users write
    assert list(sources.read_records(str(path), plain_lines=True))[0][1] == expected[0]


# ---- 2. .gz: the decompressed copy is said, and cleaned when its source goes -------------------

def test_gz_copies_are_announced_and_removed_when_the_source_changes_or_goes(
    tmp_path, monkeypatch, caplog):
  import gzip
  import logging
  import os
  cache = tmp_path / "cache"
  monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
  copies = lambda: sorted(p.name for p in (cache / "llm_jax" / "decompressed").iterdir()
                          if not p.name.endswith(".source.json"))

  def write(path, text):
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)

  a, b = tmp_path / "a.jsonl.gz", tmp_path / "b.txt.gz"
  write(a, '{"text": "一"}\n' * 1000)
  write(b, "line\n")
  with caplog.at_level(logging.INFO):
    assert len(sources.open_file(str(a))) == 1000
  copy_a = copies()
  assert len(copy_a) == 1 and copy_a[0].endswith("-a.jsonl")
  path_a = str(cache / "llm_jax" / "decompressed" / copy_a[0])
  said = " ".join(caplog.messages)
  assert f"decompressing {a}" in said and path_a in said
  assert f"{os.path.getsize(path_a) / 1e6:.1f} MB" in said  # how big the copy is
  sources.open_file(str(a))
  assert copies() == copy_a  # unchanged: reused
  write(a, '{"text": "二"}\n' * 10)  # changed: a new copy, the old one removed
  os.utime(a, ns=(1, 1))
  assert sources.open_file(str(a))[0] == {"text": "二"}
  assert len(copies()) == 1 and copies() != copy_a
  os.remove(a)  # gone: its copy goes at the next decompression of any file
  sources.open_file(str(b))
  assert [c.split("-", 1)[1] for c in copies()] == ["b.txt"]


# ---- 6. inspect shows both sides of a pair, and how it is cut --------------------------------

def test_inspect_dpo_shows_both_sides_and_the_cut(tmp_path):
  import os
  import subprocess
  import sys
  from llm_jax.data import chat_template, formats, preference, tokenizer as tok_lib
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  long_answer = "Li Ming was born in Hangzhou, a city in the east. " * 4
  pairs = [
      {"prompt": "Where was Li Ming born?", "chosen": "Hangzhou.", "rejected": "Beijing."},
      {"prompt": "Where was Li Ming born?", "chosen": long_answer, "rejected": "Beijing."},
      {"prompt": "Where was Li Ming born? " * 12, "chosen": "Hangzhou.", "rejected": "Beijing."},
  ]
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
  corpus = [chat_template.render_chat_text([{"role": "user", "content": p["prompt"]},
                                            {"role": "assistant", "content": p[s]}])
            for p in pairs for s in ("chosen", "rejected")] * 5
  tok = tok_lib.train_sentencepiece(corpus, vocab_size=300)
  model = tok.save(str(tmp_path / "tok"))
  seq_len = 96
  lengths = []  # each side's example length (tokens after the first), as DPO encodes it
  for k, p in enumerate(pairs):
    pair = formats.normalize_pair(p, f"{path}:{k + 1}")
    lengths.append([len(preference.encode_side(tok, pair["prompt"], pair[s], "x")[0]) - 1
                    for s in ("chosen", "rejected")])
  assert sum(lengths[0]) <= seq_len < sum(lengths[1])
  assert lengths[2][0] > seq_len // 2 and lengths[2][1] > seq_len // 2  # both halves: prompt only
  out = subprocess.run(
      [sys.executable, "-m", "llm_jax.data.inspect", "--config=configs/dpo.py",
       f"--config.data.train={path}", f"--config.data.tokenizer.path={model}",
       f"--config.data.seq_len={seq_len}", "--n=3"],
      cwd=root, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  blocks = text.split("--- pair ")[1:]
  assert len(blocks) == 3
  assert "fits" in blocks[0] and "[chosen:" in blocks[0] and "[rejected:" in blocks[0]
  assert "«Hangzhou.<|im_end|>" in blocks[0] and "«Beijing.<|im_end|>" in blocks[0]
  # pair 2: the rejected side (short) whole, the chosen one cut to the rest of the row
  short = lengths[1][1]
  assert f"cut to {seq_len - short} + {short} (the ends of the responses go)" in blocks[1]
  assert f"[chosen: cut off, {lengths[1][0] - (seq_len - short)} tokens]" in blocks[1]
  half = seq_len // 2
  assert f"dropped: cut to {seq_len - half} + {half}" in blocks[2]


# ---- 3. what seq_len keeps and drops, counted at start -----------------------------------------

def _kept_by_training(cfg, tok, seq_len):
  """(examples, kept) as the training pipeline decides them: every record through ToExamples (SFT)
  or ToPairExamples (DPO) at seq_len, independently of census.py's own rules."""
  from llm_jax.data import pipeline, preference
  cfg = cfg.copy_and_resolve_references()
  cfg.seq_len = seq_len
  reader = pipeline.DocReader(cfg.train, cfg)
  if cfg.mode == "dpo":
    t = preference.ToPairExamples(cfg, tok)
    outs = [t.flat_map(reader[i]) for i in range(len(reader))]
    return len(outs), sum(len(o) for o in outs)
  t = pipeline.ToExamples(cfg, tok, packing="best_fit")
  outs = [t.flat_map(reader[i]) for i in range(len(reader))]
  return len(outs), sum(len(o) for o in outs)


CHARS = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更单风切打白教速花带安场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记需段研界拉林律叫且究观越织装影算低持音众书布复容儿须际商非验连断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何除消构府称太准精值号率族维划选标写存候毛亲快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属圆包火住调满县局照参红细引听该铁价严"  # common Chinese characters: text that does not compress into a few pieces


def test_kept_and_dropped_are_counted_at_start_with_a_seq_len_that_keeps_95(tmp_path):
  from llm_jax.data import census, chat_template, tokenizer as tok_lib
  rng = random.Random(0)
  chars = CHARS
  rows = [(f"标题{i}", "".join(rng.choice(chars) for _ in range(rng.randint(5, 60))) + "。")
          for i in range(60)]
  path = tmp_path / "csl.tsv"
  path.write_text("title\tabstract\n" + "".join(f"{t}\t{a}\n" for t, a in rows), encoding="utf-8")
  tok = tok_lib.train_sentencepiece(
      [chat_template.render_chat_text([{"role": "user", "content": a},
                                       {"role": "assistant", "content": t}]) for t, a in rows],
      vocab_size=1000)
  cfg = _data_cfg(str(path), rename_fields="abstract:instruction,title:output", seq_len=48,
                  mode="sft", count_examples=1000)
  c = census.count(cfg, tok, "train")
  examples, kept = _kept_by_training(cfg, tok, 48)
  assert (c["records"], c["examples"], c["scaled"]) == (60, examples, False)
  assert c["examples"] - c["dropped"] == kept and 0 < c["dropped"] < 60 and c["cut"] > 0
  k95 = c["seq_len_keep_95"]
  assert _kept_by_training(cfg, tok, k95)[1] >= 0.95 * 60 > _kept_by_training(cfg, tok, k95 - 1)[1]
  line = census.describe(c)
  assert f"data (train): 60 examples at seq_len 48: {c['kept_whole']} whole" in line
  assert f"{c['dropped']} dropped" in line and f"seq_len {k95} would keep 95% of them" in line
  # a sample, scaled to the split
  cfg.count_examples = 20
  sampled = census.count(cfg, tok, "train")
  assert sampled["scaled"] and sampled["counted"] == 20 and sampled["examples"] == 60
  assert "estimated from an even sample of 20 of 60 records" in census.describe(sampled)
  cfg.mode = "pretrain"
  assert census.count(cfg, tok, "train") is None  # long documents are split, never dropped


def test_dpo_pairs_kept_and_dropped_are_counted(tmp_path):
  from llm_jax.data import census, chat_template, tokenizer as tok_lib
  rng = random.Random(1)
  pairs = [{"prompt": "".join(rng.choice(CHARS) for _ in range(2 * k)),
            "chosen": "好的回答" * (k % 5 + 1), "rejected": "坏" * (k % 3 + 1)}
           for k in range(1, 30)]
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs),
                  encoding="utf-8")
  tok = tok_lib.train_sentencepiece(
      [chat_template.render_chat_text([{"role": "user", "content": p["prompt"]},
                                       {"role": "assistant", "content": p["chosen"]}])
       for p in pairs], vocab_size=1000)
  cfg = _data_cfg(str(path), mode="dpo", seq_len=64, count_examples=1000)
  c = census.count(cfg, tok, "train")
  examples, kept = _kept_by_training(cfg, tok, 64)
  assert c["examples"] == examples == 29 and c["examples"] - c["dropped"] == kept
  assert 0 < c["dropped"] < 29
  k95 = c["seq_len_keep_95"]
  assert _kept_by_training(cfg, tok, k95)[1] >= 0.95 * 29 > _kept_by_training(cfg, tok, k95 - 1)[1]
