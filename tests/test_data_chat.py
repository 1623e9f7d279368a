"""ChatML template and loss mask, token by token, against hand-built expectations."""

import numpy as np
import pytest

from llm_jax.data import chat_template
from llm_jax.data import formats
from llm_jax.data import pipeline
from llm_jax.data import tokenizer as tok_lib
from configs import data as data_config
from llm_jax.data.sources import RecordError

CHAT = [
    {"role": "system", "content": "你是一个有用的助手。"},
    {"role": "user", "content": "Who wrote Hamlet?"},
    {"role": "assistant", "content": "Shakespeare wrote it."},
    {"role": "user", "content": "用中文说一遍"},
    {"role": "assistant", "content": "<think>translate</think>莎士比亚写的。"},
]


@pytest.fixture(scope="module")
def tok():
  corpus = [chat_template.render_chat_text(CHAT)] * 5 + [
      "assistant user system 莎士比亚 Shakespeare wrote Hamlet 中文 一遍"] * 5
  return tok_lib.train_sentencepiece(corpus, vocab_size=400)


def test_mask_token_by_token_matches_hand_built_expectation(tok):
  ids, weights = chat_template.encode_chat(tok, CHAT)
  s, e, nl = tok.im_start_id, tok.im_end_id, tok.encode("\n")
  enc = tok.encode
  # Hand-built: (token ids, weight) per piece of the ChatML text, in order.
  expected = [
      ([s] + enc("system\n"), 0), (enc("你是一个有用的助手。"), 0), ([e] + nl, 0),
      ([s] + enc("user\n"), 0), (enc("Who wrote Hamlet?"), 0), ([e] + nl, 0),
      ([s] + enc("assistant\n"), 0), (enc("Shakespeare wrote it."), 1), ([e], 1), (nl, 0),
      ([s] + enc("user\n"), 0), (enc("用中文说一遍"), 0), ([e] + nl, 0),
      ([s] + enc("assistant\n"), 0), (enc("<think>translate</think>莎士比亚写的。"), 1),
      ([e], 1), (nl, 0),
  ]
  want_ids = [i for piece, _ in expected for i in piece]
  want_w = [w for piece, w in expected for _ in piece]
  assert ids.tolist() == want_ids
  assert weights.tolist() == want_w
  assert ids.dtype == np.int32 and weights.dtype == np.float32


def test_weighted_runs_decode_to_exactly_the_assistant_replies(tok):
  ids, weights = chat_template.encode_chat(tok, CHAT)
  assert tok.decode(ids) == chat_template.render_chat_text(CHAT)
  runs, current = [], []
  for i, w in zip(ids, weights):
    if w == 1:
      current.append(i)
    elif current:
      runs.append(tok.decode(current))
      current = []
  assert runs == ["Shakespeare wrote it.<|im_end|>",
                  "<think>translate</think>莎士比亚写的。<|im_end|>"]
  # MaxText's bug: the generation prompt "<|im_start|>assistant\n" is never trained on.
  header = [tok.im_start_id] + tok.encode("assistant\n")
  for k in range(len(ids) - len(header) + 1):
    if ids[k:k + len(header)].tolist() == header:
      assert not weights[k:k + len(header)].any()
  assert set(np.unique(weights).tolist()) == {0.0, 1.0}


def test_example_targets_shift_with_weights(tok):
  cfg = data_config.get_config()
  cfg.seq_len = 512
  ids, weights = chat_template.encode_chat(tok, CHAT)
  [ex] = pipeline.ToExamples(cfg, tok, "best_fit").flat_map({"messages": CHAT, "where": "t"})
  np.testing.assert_array_equal(ex["inputs"], ids[:-1])
  np.testing.assert_array_equal(ex["targets"], ids[1:])
  # loss_weights[j] says whether predicting targets[j] = ids[j + 1] is trained.
  np.testing.assert_array_equal(ex["loss_weights"], weights[1:])
  assert tok.decode(ex["targets"][ex["loss_weights"] == 1]) == (
      "Shakespeare wrote it.<|im_end|><think>translate</think>莎士比亚写的。<|im_end|>")


def test_generation_prompt_for_inference(tok):
  ids, weights = chat_template.encode_chat(tok, CHAT[:2], add_generation_prompt=True)
  assert tok.decode(ids).endswith("<|im_start|>assistant\n") and not weights.any()


@pytest.mark.parametrize("messages, match", [
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "no assistant"),
    ([], "empty"),
    ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
      {"role": "assistant", "content": "a"}], "system turn may only open"),
])
def test_untrainable_conversations_are_errors(tok, messages, match):
  with pytest.raises(chat_template.ChatError, match=match):
    chat_template.encode_chat(tok, messages, where="f.jsonl:3")


def test_formats_normalise_alpaca_sharegpt_openai():
  alpaca = {"instruction": "翻译", "input": "hello", "output": "你好", "system": "sys",
            "history": [["q0", "a0"]]}
  assert formats.detect_format(alpaca, "text", "x") == "alpaca"
  assert formats.normalize(alpaca, "alpaca", "text", "x")["messages"] == [
      {"role": "system", "content": "sys"}, {"role": "user", "content": "q0"},
      {"role": "assistant", "content": "a0"}, {"role": "user", "content": "翻译\nhello"},
      {"role": "assistant", "content": "你好"}]
  no_input = {"instruction": "i", "input": "", "output": "o"}
  assert formats.normalize(no_input, "alpaca", "text", "x")["messages"][0]["content"] == "i"
  sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
  openai = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                         {"role": "assistant", "content": "a"}]}
  minimind = {"conversations": [{"role": "user", "content": "q"},
                                {"role": "assistant", "content": "a"}]}
  qa = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
  for record in (sharegpt, minimind):
    assert formats.detect_format(record, "text", "x") == "chat"
    assert formats.normalize(record, "chat", "text", "x")["messages"] == qa
  assert formats.normalize(openai, "chat", "text", "x")["messages"][1:] == qa
  assert formats.normalize({"body": "t"}, "text", "body", "x") == {"text": "t"}


@pytest.mark.parametrize("record, fmt, match", [
    ({"content": "t"}, "text", r"f.jsonl:7: the record has no field 'text'"),
    ({"text": ""}, "text", "f.jsonl:7: the text is empty"),
    ({"messages": []}, "chat", r"f.jsonl:7: the conversation under 'messages' is empty"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "chat",
     r"f.jsonl:7: conversations\[0\] has unknown role 'robot'"),
    ({"messages": [{"role": "user"}]}, "chat", r"messages\[0\] \(user\) has no string"),
    ({"instruction": "i"}, "alpaca", "without a string 'output'"),
])
def test_bad_records_name_where_and_what(record, fmt, match):
  with pytest.raises(RecordError, match=match):
    formats.normalize(record, fmt, "text", "f.jsonl:7")


def test_undetectable_format_says_what_to_set():
  with pytest.raises(RecordError, match="config.data.text_field"):
    formats.detect_format({"body": "x"}, "text", "f.jsonl:1")
