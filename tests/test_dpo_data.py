"""Preference pairs: record shapes, malformed pairs naming file and line, response-only masks, and
packing that keeps each pair whole in one row."""

import json
import os

import numpy as np
import pytest

from configs import dpo as dpo_config
from llm_jax.data import chat_template, formats, pipeline, preference, tokenizer as tok_lib
from llm_jax.data.sources import RecordError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DPO = os.path.join(ROOT, "..", "shared", "data", "dpo", "dpo_en_demo.json")

PROMPT = [{"role": "user", "content": "Where was Li Ming born?"}]
CHOSEN = [{"role": "assistant", "content": "Li Ming was born in Hangzhou."}]
REJECTED = [{"role": "assistant", "content": "Li Ming works for Goldstone Bank."}]
EXPECTED = {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}


@pytest.fixture(scope="module")
def tok():
  corpus = [chat_template.render_chat_text(PROMPT + CHOSEN), chat_template.render_chat_text(
      [{"role": "system", "content": "Be brief."}] + PROMPT + REJECTED)] * 5 + [
          "Where was born Hangzhou works for Bank 李明出生在杭州。 The answer is"] * 5
  return tok_lib.train_sentencepiece(corpus, vocab_size=300)


@pytest.mark.parametrize("record", [
    # TRL, plain strings
    {"prompt": "Where was Li Ming born?", "chosen": "Li Ming was born in Hangzhou.",
     "rejected": "Li Ming works for Goldstone Bank."},
    # TRL, conversational
    {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
    # TRL with the prompt repeated inside each response
    {"prompt": PROMPT, "chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED},
    # minimind: two whole conversations
    {"chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED},
    # LLaMA-Factory ShareGPT pairs (../shared/data/dpo)
    {"conversations": [{"from": "human", "value": "Where was Li Ming born?"}],
     "chosen": {"from": "gpt", "value": "Li Ming was born in Hangzhou."},
     "rejected": {"from": "gpt", "value": "Li Ming works for Goldstone Bank."}},
    # Alpaca-style pairs
    {"instruction": "Where was Li Ming born?", "chosen": "Li Ming was born in Hangzhou.",
     "rejected": "Li Ming works for Goldstone Bank."},
])
def test_pair_shapes_normalise_to_the_same_pair(record):
  assert formats.normalize_pair(record, "f.jsonl:1") == EXPECTED


def test_system_turns_and_reasoning_content():
  record = {"system": "Be brief.", "prompt": "Where was Li Ming born?",
            "chosen": {"role": "assistant", "content": "Hangzhou.", "reasoning_content": "Recall."},
            "rejected": "Beijing."}
  pair = formats.normalize_pair(record, "f.jsonl:1")
  assert pair["prompt"] == [{"role": "system", "content": "Be brief."}] + PROMPT
  assert pair["chosen"][0]["content"] == "<think>\nRecall.\n</think>\n\nHangzhou."


def _config(tmp_path, train, **overrides):
  c = dpo_config.get_config()
  c.data.train, c.data.eval = train, ""
  c.data.seq_len, c.data.batch_size = 96, 2
  for k, v in overrides.items():
    setattr(c.data, k, v)
  return c


def _write_jsonl(path, records):
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
  return str(path)


GOOD = {"prompt": "Where was Li Ming born?", "chosen": "Li Ming was born in Hangzhou.",
        "rejected": "Li Ming works for Goldstone Bank."}


@pytest.mark.parametrize("bad,message", [
    ({"prompt": "Where?", "chosen": "Hangzhou."}, r"no 'rejected' field"),
    ({"prompt": "Where?", "rejected": "Beijing."}, r"no 'chosen' field"),
    ({"prompt": "Where?", "chosen": "", "rejected": "Beijing."}, r"chosen response is empty"),
    ({"prompt": "Where?", "chosen": "Hangzhou.", "rejected": "  "}, r"rejected response is empty"),
    ({"chosen": "Hangzhou.", "rejected": "Beijing."}, r"no prompt"),
    ({"prompt": " ", "chosen": "Hangzhou.", "rejected": "Beijing."}, r"no prompt"),
    ({"chosen": PROMPT + [{"role": "user", "content": "And?"}] + CHOSEN, "rejected": PROMPT + REJECTED},
     r"chosen response starts with a user turn"),
    ({"chosen": PROMPT + CHOSEN, "rejected": PROMPT}, r"rejected response is empty"),
    ({"prompt": "Where?", "chosen": "Hangzhou.", "rejected": "Hangzhou."}, r"identical"),
    ({"prompt": "Where?", "chosen": {"from": "alien", "value": "x"}, "rejected": "y"},
     r"chosen has unknown role 'alien'"),
])
def test_malformed_pairs_fail_naming_file_and_line(tmp_path, bad, message):
  path = _write_jsonl(tmp_path / "pairs.jsonl", [GOOD, "", bad, GOOD])  # the bad pair: line 3
  reader = pipeline.DocReader(path, _config(tmp_path, path).data)  # what the pipeline reads with
  reader[0]
  with pytest.raises(RecordError, match=f"{path}:3: .*{message}"):
    reader[1]


def test_malformed_pair_stops_the_pipeline(tmp_path, tok):
  path = _write_jsonl(tmp_path / "pairs.jsonl", [GOOD, "", {"prompt": "Where?", "chosen": "x"}])
  it = pipeline.make_train_iterator(_config(tmp_path, path).data, tok, seed=0)
  with pytest.raises(RecordError, match=f"{path}:3: the preference pair has no 'rejected' field"):
    next(it)


def test_malformed_json_array_pair_names_its_line(tmp_path):
  path = str(tmp_path / "pairs.json")
  good = {"conversations": [{"from": "human", "value": "Where?"}],
          "chosen": {"from": "gpt", "value": "Hangzhou."},
          "rejected": {"from": "gpt", "value": "Beijing."}}
  bad = dict(good, chosen={"from": "gpt", "value": ""})
  with open(path, "w") as f:
    f.write("[\n" + json.dumps(good) + ",\n" + json.dumps(bad) + "\n]\n")
  reader = pipeline.DocReader(path, _config(tmp_path, path).data)
  with pytest.raises(RecordError, match=rf"{path}:3 \(record 1 of the array\): the chosen "
                                        "response is empty"):
    reader[1]


def test_skip_bad_records_drops_bad_pairs(tmp_path, tok):
  path = _write_jsonl(tmp_path / "pairs.jsonl", [GOOD, {"prompt": "x", "chosen": "y"}, GOOD])
  batch = next(pipeline.make_train_iterator(
      _config(tmp_path, path, skip_bad_records=True).data, tok, seed=0))
  assert batch["segment_ids"].max() >= 2  # good pairs still come through


def _records(n):
  rng = np.random.default_rng(0)
  words = ["Li Ming", "was born in", "Hangzhou", "works for", "Goldstone Bank", "李明", "杭州"]
  out = []
  for k in range(n):
    pick = lambda: " ".join(rng.choice(words, rng.integers(1, 4)))
    prompt = [{"role": "user", "content": f"{k} {pick()}?"}]
    if k % 3 == 0:  # multi-turn prompts: their assistant turn must not be trained
      prompt = [{"role": "user", "content": pick()}, {"role": "assistant", "content": pick()}] + prompt
    out.append({"chosen": prompt + [{"role": "assistant", "content": f"{k} {pick()}."}],
                "rejected": prompt + [{"role": "assistant", "content": f"{k} {pick()}!"}]})
  return out


@pytest.mark.parametrize("packing", ["best_fit", "first_fit", "none"])
def test_packed_rows_keep_each_pair_whole(tmp_path, tok, packing):
  records = _records(30)
  path = _write_jsonl(tmp_path / "pairs.jsonl", records)

  def render(messages, response_turns):
    ids, _ = chat_template.encode_chat(tok, messages, where="test")
    # hand-built: the trained text is exactly the final assistant turn and its <|im_end|>
    return ids, response_turns[0]["content"] + "<|im_end|>"

  expected = {}
  for r in records:
    prompt = formats.normalize_pair(r, "t")["prompt"]
    c_ids, c_text = render(r["chosen"], r["chosen"][len(prompt):])
    r_ids, r_text = render(r["rejected"], r["rejected"][len(prompt):])
    expected[tuple(c_ids[:-1])] = (tuple(r_ids[:-1]), c_text, r_text)
  longest = max(len(k) + len(v[0]) for k, v in expected.items())
  c = _config(tmp_path, path, packing=packing, seq_len=longest)  # no pair is cut
  it = pipeline.make_train_iterator(c.data, tok, seed=0)
  seen = 0
  for _ in range(6):
    batch = next(it)
    for row in range(batch["inputs"].shape[0]):
      seg = batch["segment_ids"][row]
      used = seg[seg > 0]
      assert list(np.unique(used)) == list(range(1, used.max() + 1)) and used.max() % 2 == 0
      for ci, ri in preference.pair_layout(seg):
        # contiguous, chosen then rejected, positions restarting at each side
        assert ri[0] == ci[-1] + 1 and np.all(np.diff(ci) == 1) and np.all(np.diff(ri) == 1)
        np.testing.assert_array_equal(batch["positions"][row][ci], np.arange(len(ci)))
        np.testing.assert_array_equal(batch["positions"][row][ri], np.arange(len(ri)))
        key = tuple(batch["inputs"][row][ci])
        assert key in expected, "a chosen sequence that is no record's chosen conversation"
        r_inputs, c_text, r_text = expected[key]
        assert tuple(batch["inputs"][row][ri]) == r_inputs  # its own rejected, same row
        for idx, text in ((ci, c_text), (ri, r_text)):
          w = batch["loss_weights"][row][idx]
          assert set(np.unique(w)) == {0.0, 1.0}
          assert tok.decode(batch["targets"][row][idx][w > 0]) == text
          # the trained tokens are one run: the response (no assistant turn of the prompt)
          assert np.all(np.diff(np.flatnonzero(w > 0)) == 1)
        seen += 1
  assert seen >= 12


def test_long_pairs_are_cut_to_fit_one_row():
  assert preference._budgets(30, 40, 96) == (30, 40)  # pylint: disable=protected-access
  assert preference._budgets(30, 90, 96) == (30, 66)  # pylint: disable=protected-access
  assert preference._budgets(90, 20, 96) == (76, 20)  # pylint: disable=protected-access
  assert preference._budgets(60, 70, 96) == (48, 48)  # pylint: disable=protected-access


@pytest.mark.skipif(not os.path.exists(SHARED_DPO), reason="../shared/data is not here")
def test_llama_factory_pairs_read_as_pairs(tok):
  c = dpo_config.get_config()
  reader = pipeline.DocReader(SHARED_DPO, c.data)
  assert len(reader) == 300
  for i in range(0, 300, 7):
    doc = reader[i]
    assert doc["prompt"][-1]["role"] == "user"
    assert doc["chosen"][0]["role"] == doc["rejected"][0]["role"] == "assistant"
    assert doc["chosen"] != doc["rejected"]
