"""llm_jax.data.synth: chunking, JSON repair, grounding, retry policy, ledger, and whole runs
against a scripted OpenAI-compatible server (tests/synth_stub.py) on 127.0.0.1."""

import collections
import dataclasses
import email.utils
import json
import os
import re
import subprocess
import sys
import time

import pytest

from llm_jax.data.synth import client as client_lib
from llm_jax.data.synth import documents
from llm_jax.data.synth import ledger as ledger_lib
from llm_jax.data.synth import run as run_lib
from llm_jax.data.synth import validate
from tests.synth_stub import MODEL, StubServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- chunking

def test_split_sentences_follows_cut_at_sentences_rules():
  text = "Pi is 3.14 exactly. He said “yes.” Then（括号）。第二句！\n新段落没有句号"
  got = documents.split_sentences(text)
  assert got == ["Pi is 3.14 exactly. ", "He said “yes.” ", "Then（括号）。", "第二句！\n",
                 "新段落没有句号"]
  assert "".join(got) == text


def test_chunks_are_whole_sentences_within_budget_with_overlap():
  # Five 5-character sentences, budget 10, overlap 5: each chunk repeats the previous one's
  # last sentence. Written out by hand.
  text = "AAAA。BBBB。CCCC。DDDD。EEEE。"
  got = documents.chunk_text(text, documents.ChunkSpec(budget=10, overlap=5))
  assert got == ["AAAA。BBBB。", "BBBB。CCCC。", "CCCC。DDDD。", "DDDD。EEEE。"]
  # No overlap: a plain partition.
  got = documents.chunk_text(text, documents.ChunkSpec(budget=10, overlap=0))
  assert got == ["AAAA。BBBB。", "CCCC。DDDD。", "EEEE。"]
  # The overlap never takes the room of the next new sentence (7 + 5 > 10 leaves it out).
  got = documents.chunk_text("AAAAAA。BBBB。CCCCCCCC。", documents.ChunkSpec(budget=10, overlap=5))
  assert got == ["AAAAAA。", "BBBB。", "CCCCCCCC。"]
  # A sentence over the budget is cut hard into pieces that fit.
  got = documents.chunk_text("x" * 25 + "。", documents.ChunkSpec(budget=10, overlap=0))
  assert got == ["x" * 10, "x" * 10, "x" * 5 + "。"]


def test_token_budget_uses_the_given_counter():
  # "Tokens" = UTF-8 bytes here: every character below is 3, so 5 of them fit in 15. The
  # 7-character sentence is cut after its longest prefix that fits.
  size = lambda s: len(s.encode("utf-8"))
  got = documents.chunk_text("甲乙。丙丁。戊己庚辛壬癸。", documents.ChunkSpec(budget=15, overlap=0), size)
  assert got == ["甲乙。", "丙丁。", "戊己庚辛壬", "癸。"]


def test_token_counter_reads_a_tokenizer_file(tmp_path):
  from llm_jax.data import tokenizer as tok_lib
  tok = tok_lib.train_sentencepiece(["the river flows north.", "河流向北流。"] * 50,
                                          vocab_size=300)
  count = documents.token_counter(tok.save(str(tmp_path)))
  for text in ("the river flows north.", "河流向北流。", "unseen words 未见"):
    assert count(text) == len(tok.encode(text))


def _write_jsonl(path, records):
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  return str(path)


def test_documents_ids_cleaning_and_clear_errors(tmp_path):
  docs = _write_jsonl(tmp_path / "d.jsonl", [
      {"text": "《战国无双3》（）是游戏。", "title": "A"}, {"text": "Second.", "title": "A"}])
  chunks = list(documents.iter_chunks(documents.DocOptions(paths=(docs,), doc_id_field="title"),
                                      documents.ChunkSpec()))
  assert [(c.doc_id, c.chunk_id, c.text) for c in chunks] == [
      ("A", "d.jsonl:0/0", "《战国无双3》是游戏。"), ("A", "d.jsonl:1/0", "Second.")]
  chat = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
  with pytest.raises(documents.DocumentError, match=r"chat\.jsonl:1: --docs wants text documents"):
    list(documents.iter_documents(documents.DocOptions(paths=(chat,))))
  with pytest.raises(documents.DocumentError, match=r"d\.jsonl:1: the record has no field 'id'"):
    list(documents.iter_documents(documents.DocOptions(paths=(docs,), doc_id_field="id")))


# ---------------------------------------------------------------- replies and pairs

@pytest.mark.parametrize("reply, value, how", [
    ('[{"question": "q", "answer": "a"}]', [{"question": "q", "answer": "a"}], "json"),
    ('Sure! Here they are:\n```json\n[{"question": "q", "answer": "a"}]\n```\nEnjoy.',
     [{"question": "q", "answer": "a"}], "fenced"),
    ('<think>let me see [x]</think>\n[{"question": "q", "answer": "a"}]',
     [{"question": "q", "answer": "a"}], "json"),
    ("[{'question': 'q', 'answer': 'a',},]", [{"question": "q", "answer": "a"}], "repaired"),
    ('[{"question": "q", "answer": "a"}, {"question": "r", "ans',
     [{"question": "q", "answer": "a"}, {"question": "r"}], "repaired"),
    ("Sorry, I cannot help with that.", None, "unparseable"),
    ("", None, "unparseable"),
])
def test_parse_reply(reply, value, how):
  assert validate.parse_reply(reply) == (value, how)


def test_grounding_score_by_hand():
  chunk = "李明宇在浙江大学学习物理。He was born in Paris in 1901."
  assert validate.grounding("浙江大学", chunk) == 1.0  # 浙江 江大 大学: all in the chunk
  assert validate.grounding("北京大学", chunk) == pytest.approx(1 / 3)  # only 大学
  assert validate.grounding("born in Paris 1900", chunk) == pytest.approx(3 / 4)  # not 1900
  assert validate.grounding("", chunk) == 0.0


def test_check_pair_reasons():
  chunk = "The river Alpha flows through Beta. Beta was founded in 1850."
  lim = validate.Limits(min_question_chars=4, max_question_chars=40, max_answer_chars=30,
                        min_grounding=0.6)
  good, reason = validate.check_pair({"Q": " When was Beta founded? ", "答案": 1850}, chunk, lim)
  assert reason is None and good == {"question": "When was Beta founded?", "answer": "1850",
                                     "grounding": 1.0}
  cases = [("just a string", "schema"), ({"question": "Who?"}, "empty"),
           ({"question": "Why?", "answer": "  "}, "empty"),
           ({"question": "x" * 41, "answer": "Beta"}, "question_length"),
           ({"question": "Who is it?", "answer": "Beta " * 7}, "answer_length"),
           ({"question": "Who won the cup?", "answer": "France won the cup."}, "ungrounded")]
  for item, expected in cases:
    assert validate.check_pair(item, chunk, lim) == (None, expected), item


def test_judge_scores_and_paraphrase_rows():
  assert validate.parse_scores([9, "7", {"score": 3}], 3) == [9.0, 7.0, 3.0]
  assert validate.parse_scores([9, 11, 3], 3) is None
  assert validate.parse_scores([9, 7], 3) is None
  assert validate.parse_paraphrases({"paraphrases": [["a", "b"], "c"]}, 2) == [["a", "b"], ["c"]]
  assert validate.parse_paraphrases([["a"]], 2) is None


# ---------------------------------------------------------------- retry policy

class _Response:
  def __init__(self, headers):
    self.headers = headers


class _Err(Exception):
  def __init__(self, headers):
    super().__init__("e")
    self.response = _Response(headers)


def test_retry_after_header_forms():
  assert client_lib.retry_after_seconds(_Err({"retry-after": "3"})) == 3.0
  assert client_lib.retry_after_seconds(_Err({"retry-after-ms": "250", "retry-after": "9"})) == 0.25
  date = email.utils.formatdate(time.time() + 30, usegmt=True)
  assert 25 < client_lib.retry_after_seconds(_Err({"retry-after": date})) <= 30
  assert client_lib.retry_after_seconds(_Err({})) is None


# ---------------------------------------------------------------- ledger

def _record(q, chunk):
  return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "a"}],
          "metadata": {"chunk_id": chunk}}


def test_ledger_cuts_uncommitted_and_torn_output_on_resume(tmp_path):
  out = str(tmp_path / "qa.jsonl")
  settings = {"model": "m"}
  store = ledger_lib.Store(out, ("all",), settings)
  store.commit("c0", "s0", {"all": [_record("q0", "c0"), _record("q1", "c0")]}, "ok")
  store.commit("c1", "s1", {"all": []}, "ok")
  store.commit("c2", "s2", {"all": []}, "rejected")
  store.close()
  committed = open(out, "rb").read()
  # A crash after the output write but before the ledger line, then one inside a write:
  with open(out, "ab") as f:
    f.write((json.dumps(_record("orphan", "c3")) + "\n").encode() + b'{"messages": [{"ro')
  with open(store.ledger_path, "ab") as f:
    f.write(b'{"chunk": "c3", "sh')
  again = ledger_lib.Store(out, ("all",), settings)
  assert open(out, "rb").read() == committed
  assert again.dropped_bytes > 0
  assert again.done == {"c0": "s0", "c1": "s1", "c2": "s2"} and again.failed == {"c2"}
  assert again.load_questions() == {"q0", "q1"}
  again.commit("c3", "s3", {"all": [_record("q3", "c3")]}, "ok")
  again.close()
  lines = open(out, "rb").read().splitlines()
  assert [json.loads(l)["messages"][0]["content"] for l in lines] == ["q0", "q1", "q3"]
  ledger_lines = [json.loads(l) for l in open(store.ledger_path, "rb").read().splitlines()]
  assert [e.get("chunk") for e in ledger_lines] == [None, "c0", "c1", "c2", "c3"]

  with pytest.raises(ledger_lib.LedgerError, match=r"model: 'm' then, 'n' now"):
    ledger_lib.Store(out, ("all",), {"model": "n"})
  os.truncate(out, 10)
  with pytest.raises(ledger_lib.LedgerError, match="edited or truncated"):
    ledger_lib.Store(out, ("all",), settings)
  other = tmp_path / "mine.jsonl"
  other.write_text('{"text": "not ours"}\n')
  with pytest.raises(ledger_lib.LedgerError, match="exists but its ledger"):
    ledger_lib.Store(str(other), ("all",), settings)


# ---------------------------------------------------------------- whole runs on the stub

def _doc(n: int) -> str:
  return (f"DOC{n:02d} The river Alpha{n:02d} flows through the town of Beta{n:02d}. "
          f"The town was founded in 18{n:02d}. All towns in the valley use the same calendar.")


def _pair(n: int, k: int) -> dict:
  return [{"question": f"Which river flows through Beta{n:02d}?", "answer": f"The river Alpha{n:02d}."},
          {"question": f"When was the town of Beta{n:02d} founded?", "answer": f"In 18{n:02d}."}][k]


SHARED = {"question": "Which calendar do the towns in the valley use?",
          "answer": "All towns in the valley use the same calendar."}
ZH_DOC = "DOC11 李明宇于1965年3月12日出生在杭州。他在浙江大学学习物理学。"
ZH_PAIR = {"question": "李明宇在哪所大学学习物理学？", "answer": "浙江大学"}


def _dumps(x) -> str:
  return json.dumps(x, ensure_ascii=False)


SCRIPT = {
    "DOC01": [{"content": _dumps([_pair(1, 0), _pair(1, 1), SHARED])}],
    "DOC02": [{"content": "Here you go:\n```json\n" + _dumps([_pair(2, 0), _pair(2, 1)]) + "\n```"}],
    "DOC03": [{"content": "[{'question': 'Which river flows through Beta03?', "
                          "'answer': 'The river Alpha03.',},]"}],
    "DOC04": [{"content": "Sorry, I cannot do that."}],  # twice: the reply is asked again once
    "DOC05": [{"content": _dumps([
        _pair(5, 0),
        {"question": "Who won the 1998 World Cup?", "answer": "France won the World Cup final."},
        {"question": " which river flows through beta05 ", "answer": "The river Alpha05."},
        {"question": "What is it?", "answer": ""},
        "not an object"])}],
    "DOC06": [{"status": 429, "headers": {"Retry-After": "0.3"}},
              {"content": _dumps([_pair(6, 0), SHARED])}],
    "DOC07": [{"status": 500}, {"content": _dumps([_pair(7, 0)])}],
    "DOC08": [{"sleep": 4.0, "content": "[]"}, {"content": _dumps([_pair(8, 1)])}],
    "DOC09": [{"status": 400}],
    "DOC10": [{"status": 502}],  # every attempt
    "DOC11": [{"content": _dumps([ZH_PAIR])}],
}
EXPECTED_PAIRS = {(p["question"], p["answer"]) for p in [
    _pair(1, 0), _pair(1, 1), SHARED, _pair(2, 0), _pair(2, 1), _pair(3, 0), _pair(5, 0),
    _pair(6, 0), _pair(7, 0), _pair(8, 1), ZH_PAIR]}


def _config(docs, out, base_url, **kw) -> run_lib.SynthConfig:
  endpoint = client_lib.EndpointConfig(base_url=base_url, model=MODEL, timeout=kw.pop("timeout", 10.0),
                                       max_retries=2, backoff=0.001, max_backoff=5.0)
  cfg = run_lib.SynthConfig(docs=documents.DocOptions(paths=(docs,), doc_id_field=kw.pop("doc_id_field", "")),
                            chunks=documents.ChunkSpec(), endpoint=endpoint, out=str(out),
                            concurrency=4, fsync=False)
  return dataclasses.replace(cfg, **kw)


def _read(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _pairs(records):
  return {(r["messages"][-2]["content"], r["messages"][-1]["content"]) for r in records}


def test_scripted_endpoint_keeps_exactly_the_good_pairs_and_retries_only_transient_errors(tmp_path):
  docs = _write_jsonl(tmp_path / "docs.jsonl",
                      [{"text": _doc(n)} for n in range(1, 11)] + [{"text": ZH_DOC}])
  out = tmp_path / "qa.jsonl"
  with StubServer(SCRIPT) as server:
    summary = run_lib.run(_config(docs, out, server.base_url, timeout=1.5, parse_retries=1))
    counts = dict(server.counts)
    bodies = server.bodies
  records = _read(out)
  assert _pairs(records) == EXPECTED_PAIRS
  assert len(records) == len(EXPECTED_PAIRS)  # no duplicate line
  # Requests per document: one, plus a retry for each 429 / 500 / timeout, plus a second ask
  # for the unreadable reply; the 400 is not retried; the 502 is tried 1 + max_retries times.
  assert counts == {"DOC01": 1, "DOC02": 1, "DOC03": 1, "DOC04": 2, "DOC05": 1, "DOC06": 2,
                    "DOC07": 2, "DOC08": 2, "DOC09": 1, "DOC10": 3, "DOC11": 1}
  assert summary.retries == {"429": 1, "5xx": 3, "timeout": 1}
  assert summary.retry_wait_s["429"] == 0.3  # Retry-After, not the 0.001 s backoff
  assert summary.retry_wait_s["5xx"] < 0.05 and summary.requests == {"qa": 17}
  assert (summary.chunks_total, summary.chunks_done, summary.chunks_rejected,
          summary.chunks_gave_up) == (11, 10, 1, 1)
  c = summary.counts
  assert (c["replies_json"], c["replies_fenced"], c["replies_repaired"],
          c["replies_unparseable"], c["resampled_qa"]) == (6, 1, 1, 1, 1)
  assert dict(summary.invalid) == {"unparseable": 1, "ungrounded": 1, "duplicate": 2,
                                   "empty": 1, "schema": 1}
  assert c["pairs_proposed"] == 3 + 2 + 1 + 5 + 2 + 1 + 1 + 1 and c["pairs_kept"] == 11
  # Tokens are the server's usage: the stub counts characters of each 200 reply.
  replies = [s["content"] for k, steps in SCRIPT.items() for s in steps if "content" in s
             and "sleep" not in s] + [SCRIPT["DOC04"][0]["content"]]
  assert summary.tokens["completion"] == sum(len(r) for r in replies)
  # The Chinese document got the Chinese prompt, the others the English one.
  langs = {b["messages"][0]["content"].count("<document>") and
           ("zh" if "问答对" in b["messages"][0]["content"] else "en") for b in bodies}
  assert langs == {"zh", "en"}
  assert all(b["model"] == MODEL and len(b["messages"]) == 1 for b in bodies)
  meta = {r["messages"][-2]["content"]: r["metadata"] for r in records}
  assert meta[ZH_PAIR["question"]]["doc_id"] == "docs.jsonl:10"
  assert meta[ZH_PAIR["question"]]["chunk_id"] == "docs.jsonl:10/0"
  saved = json.load(open(tmp_path / "qa.summary.json"))
  assert saved["retries"] == summary.retries and saved["chunks_gave_up"] == 1
  text = summary.format()
  assert "retries    5: 429 x1 (waited 0.3 s), 5xx x3" in text and "1 rejected by the endpoint" in text

  # Rerun: only the chunk that gave up is asked again (the 400 is on the ledger as rejected);
  # a question already in the output is not written twice.
  with StubServer({"DOC10": [{"content": _dumps([_pair(10, 0), SHARED])}]}) as server:
    summary = run_lib.run(_config(docs, out, server.base_url, parse_retries=1))
    assert dict(server.counts) == {"DOC10": 1}
  records = _read(out)
  assert summary.chunks_before == 10 and summary.chunks_done == 1
  assert _pairs(records) == EXPECTED_PAIRS | {(_pair(10, 0)["question"], _pair(10, 0)["answer"])}
  assert len(records) == len(EXPECTED_PAIRS) + 1 and dict(summary.invalid) == {"duplicate": 1}


def test_judge_paraphrases_and_document_split(tmp_path):
  # Two sentences per document (no shared one): the stub writes one pair per sentence.
  records_in = [{"text": _doc(n).rsplit(" All towns", 1)[0], "title": f"T{n % 3}"}
                for n in range(1, 7)]
  docs = _write_jsonl(tmp_path / "docs.jsonl", records_in)
  script = {
      "DOC01/judge": [{"content": "[9, 3]"}],  # the stub writes 2 pairs for each document
      "DOC02/judge": [{"content": "I'd rate them well."}],  # unreadable twice: pairs dropped
      "DOC03/paraphrase": [{"content": _dumps([
          ["Which sentence of DOC03 starts 'The river Alpha03'?", "A same question"],
          ["A same question", "", "Which sentence says when Beta03 was founded?"]])}],
  }
  out = tmp_path / "qa.jsonl"
  with StubServer(script) as server:
    summary = run_lib.run(_config(docs, out, server.base_url, judge=True, judge_threshold=7,
                                  paraphrases=2, split_by="document", val_fraction=0.5,
                                  split_seed=4,  # puts T1 in val, T0 and T2 in train
                                  doc_id_field="title", system="You answer briefly."))
  assert summary.out == {"train": str(tmp_path / "qa.train.jsonl"),
                         "val": str(tmp_path / "qa.val.jsonl")}
  train, val = _read(summary.out["train"]), _read(summary.out["val"])
  titles = [{r["metadata"]["doc_id"] for r in part} for part in (train, val)]
  assert titles == [{"T0", "T2"}, {"T1"}]  # no document in both
  records = train + val
  originals = [r for r in records if "paraphrase_of" not in r["metadata"]]
  by_doc = collections.Counter(r["metadata"]["chunk_id"] for r in originals)
  # DOC01: one pair scored >= 7; DOC02: judge unreadable, none; others: both pairs (score 8).
  assert by_doc == {"docs.jsonl:0/0": 1, "docs.jsonl:2/0": 2, "docs.jsonl:3/0": 2,
                    "docs.jsonl:4/0": 2, "docs.jsonl:5/0": 2}
  assert summary.invalid["judge_low"] == 1 and summary.invalid["judge_unreadable"] == 2
  assert all(r["metadata"]["judge_score"] >= 7 for r in records)
  # Paraphrases keep the answer of their question. DOC03's scripted rows: two good variants;
  # then one repeating the row above, an empty one, and a third beyond --paraphrases=2.
  answers = {r["messages"][-2]["content"]: r["messages"][-1]["content"] for r in originals}
  for r in records:
    if "paraphrase_of" in r["metadata"]:
      assert r["messages"][-1]["content"] == answers[r["metadata"]["paraphrase_of"]]
  doc03 = [r["messages"][-2]["content"] for r in records
           if r["metadata"]["chunk_id"] == "docs.jsonl:2/0" and "paraphrase_of" in r["metadata"]]
  assert doc03 == ["Which sentence of DOC03 starts 'The river Alpha03'?", "A same question"]
  c = summary.counts
  assert c["paraphrases_invalid"] == 1 and c["paraphrases_duplicate"] == 1
  assert c["paraphrases_kept"] == 2 + 2 + 3 * 2 * 2  # DOC01, DOC03, DOC04-06: 2 per question
  assert all(r["messages"][0] == {"role": "system", "content": "You answer briefly."}
             for r in records)

  # The SFT reader reads the file as chats and ignores "metadata".
  from configs import data as data_config
  from llm_jax.data import pipeline
  reader = pipeline.DocReader(summary.out["train"], data_config.get_config())
  assert reader.format == "chat"
  assert [reader[i]["messages"] for i in range(len(reader))] == [r["messages"] for r in train]


def test_user_errors_stop_before_any_request(tmp_path):
  docs = _write_jsonl(tmp_path / "docs.jsonl", [{"text": _doc(1)}])
  with StubServer(models=("other-a", "other-b")) as server:
    with pytest.raises(client_lib.EndpointError, match=r"--model='stub-model' is not served.*other-b"):
      run_lib.run(_config(docs, tmp_path / "qa.jsonl", server.base_url))
    assert not server.counts
  with StubServer({"DOC01": [{"status": 401}]}) as server:  # a bad key fails every request
    summary = run_lib.run(_config(docs, tmp_path / "qa.jsonl", server.base_url))
    assert dict(server.counts) == {"DOC01": 1}  # not retried
  assert re.search(r"answered 401.*--api_key_env", summary.stopped)
  assert "stopped early" in summary.format()


def test_a_server_that_keeps_failing_stops_the_run(tmp_path):
  docs = _write_jsonl(tmp_path / "docs.jsonl", [{"text": _doc(n)} for n in range(1, 21)])
  with StubServer({f"DOC{n:02d}": [{"status": 503}] for n in range(1, 21)}) as server:
    summary = run_lib.run(_config(docs, tmp_path / "qa.jsonl", server.base_url, concurrency=2))
    time.sleep(0.2)  # requests already in flight end; nothing queued is sent after the stop
    sent = sum(server.counts.values())
  assert "4 chunks in a row failed after all retries" in summary.stopped
  assert summary.chunks_gave_up == 4 and summary.chunks_done == 0
  # 3 attempts per chunk; besides the 4 that gave up, at most 2 x concurrency chunks were
  # queued or in flight, and the queued ones are never sent.
  assert 3 * 4 <= sent <= 3 * (4 + 2 * 2)
  with pytest.raises(ValueError, match=r"--chunk_overlap=200 must be >= 0 and < --chunk_size=100"):
    _config(docs, tmp_path / "qa.jsonl", "http://x", chunks=documents.ChunkSpec(budget=100)).validate()
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine."}\n{"text": "broken\n')
  out = subprocess.run(
      [sys.executable, "-m", "llm_jax.data.synth", f"--docs={bad}", "--base_url=http://127.0.0.1:9/v1",
       "--model=m", f"--out={tmp_path / 'q.jsonl'}"], capture_output=True, text=True, cwd=ROOT,
      timeout=120)
  assert out.returncode == 2
  assert out.stderr.strip().count("\n") == 0  # one line
  assert out.stderr.startswith(f"error: {bad}:2: malformed JSON")
  assert not os.path.exists(tmp_path / "q.jsonl")


def test_rerun_after_a_document_was_edited_asks_for_that_chunk_only(tmp_path):
  docs = tmp_path / "docs.txt"  # plain text: one document per line
  docs.write_text(_doc(1) + "\n" + _doc(2) + "\n")
  out = tmp_path / "qa.jsonl"
  with StubServer() as server:
    run_lib.run(_config(str(docs), out, server.base_url))
    docs.write_text(_doc(1) + "\n" + _doc(2).replace("18", "19") + "\n")
    server.counts.clear()
    summary = run_lib.run(_config(str(docs), out, server.base_url))
    assert dict(server.counts) == {"DOC02": 1}
  assert summary.counts["chunks_changed_since_last_run"] == 1 and summary.chunks_before == 1
  assert "1 chunks differ from the last run" in summary.format()
