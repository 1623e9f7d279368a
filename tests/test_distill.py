"""Reasoning distillation: tag weights on a rendered trace token by token, the loss (with and
without a teacher) against a float64 hand computation, think tags as single tokens in both
tokenizer kinds, reasoning_content, showing/hiding reasoning, and a run through the real loop."""

import math

import jax
import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer as RawHFTokenizer, models, pre_tokenizers

from configs import distill as distill_config
from llm_jax.data import chat_template, formats, pipeline, reasoning, tokenizer as tok_lib
from llm_jax.data.hf_tokenizer import HFTokenizer
from llm_jax.infer import reasoning as show
from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder
from llm_jax import checkpoint
from llm_jax.train import distill, frozen, loop
from tests import post_training_runs
from tests.model_reference import random_params
from tests.numerics import assert_close

TAG_WEIGHT = 10.0


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tok_lib.Tokenizer.load(post_training_runs.make_tokenizer(
      str(tmp_path_factory.mktemp("tok"))))


def test_tag_weights_on_a_rendered_trace(tok):
  messages = [{"role": "system", "content": "Think first."},
              {"role": "user", "content": "What does <think> mean?"},  # a tag in the prompt
              {"role": "assistant", "content": "<think>\nThe question asks.\n</think>\n\nSo it is."}]
  ids, sft_weights = chat_template.encode_chat(tok, messages)
  # Hand-built rendering, piece by piece: (ids, weight), "tag" for a trained tag token.
  enc, nl = tok.encode, tok.encode("\n")
  pieces = [([tok.im_start_id] + enc("system\n"), 0), (enc("Think first."), 0),
            ([tok.im_end_id] + nl, 0),
            ([tok.im_start_id] + enc("user\n"), 0), (enc("What does "), 0), (enc("<think>"), 0),
            (enc(" mean?"), 0), ([tok.im_end_id] + nl, 0),
            ([tok.im_start_id] + enc("assistant\n"), 0), (enc("<think>"), "tag"),
            (enc("\nThe question asks.\n"), 1), (enc("</think>"), "tag"), (enc("\n\nSo it is."), 1),
            ([tok.im_end_id], 1), (nl, 0)]
  think, end_think = tok.token_to_id("<think>"), tok.token_to_id("</think>")
  assert enc("<think>") == [think] and enc("</think>") == [end_think]  # single tokens
  np.testing.assert_array_equal(ids, [i for p, _ in pieces for i in p])
  expected = np.array([TAG_WEIGHT if w == "tag" else w for p, w in pieces for _ in p], np.float32)
  tag_ids = distill.tag_token_ids(tok, "<think>,</think>")
  assert tag_ids == (think, end_think)
  # Targets are ids[1:]: the weight of predicting each next token.
  w = np.asarray(distill.token_weights(ids[None, 1:], sft_weights[None, 1:], tag_ids, TAG_WEIGHT))
  np.testing.assert_array_equal(w[0], expected[1:])
  assert sorted(set(w[0].tolist())) == [0.0, 1.0, TAG_WEIGHT]


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_equals_hand_computation(tok):
  c = distill_config.get_config()
  c.data.synthetic.n_entities = post_training_runs.N_ENTITIES
  c.data.seq_len, c.data.batch_size = 256, 2
  batch = next(pipeline.make_train_iterator(c.data, tok, seed=0))
  cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    head_dim=8, mlp_dim=64, tie_embeddings=False)
  teacher_cfg = ModelConfig(vocab_size=tok.vocab_size, dim=48, n_layers=1, n_heads=4,
                            n_kv_heads=4, head_dim=12, mlp_dim=96, tie_embeddings=False)  # another shape
  params = random_params(cfg, seed=0, std=0.3)
  teacher = random_params(teacher_cfg, seed=1, std=0.3)
  tag_ids = distill.tag_token_ids(tok, "<think>,</think>")

  def forward(model_cfg, p):
    return Decoder(model_cfg).apply({"params": p}, batch["inputs"], batch["positions"],
                                    batch["segment_ids"])

  s_logits = np.asarray(jax.jit(forward, static_argnums=0)(cfg, params), np.float64)
  logsm = _np_log_softmax(s_logits)
  t_logits = np.asarray(jax.jit(forward, static_argnums=0)(teacher_cfg, teacher), np.float64)
  ce = -np.take_along_axis(logsm, batch["targets"][..., None], -1)[..., 0]
  trained = batch["loss_weights"]
  is_tag = np.isin(batch["targets"], tag_ids)
  assert (is_tag & (trained > 0)).sum() >= 4  # the traces' tags are trained
  w = trained * np.where(is_tag, TAG_WEIGHT, 1.0)
  # The loss is normalised by the weights used (sum of w), not by the token count.
  expected = (w * ce).sum() / w.sum()

  obj = distill.objective(cfg, tag_ids=tag_ids, tag_weight=TAG_WEIGHT)
  sums = jax.jit(obj.sums)(params, {}, batch, jax.random.key(0))
  m = jax.device_get(obj.metrics(sums))
  assert_close(m["loss"], expected, rel=1e-5)
  assert_close(float(sums["loss"]) / float(obj.normalizer(batch)), expected, rel=1e-5)  # the step's
  assert_close(m["ce"], (trained * ce).sum() / trained.sum(), rel=1e-5)
  assert m["trained_tokens"] == trained.sum()

  # With a teacher: (1 - alpha) CE + alpha T^2 KL(teacher_T || student_T), same weights.
  alpha, T = 0.3, 2.0
  p_t = np.exp(_np_log_softmax(t_logits / T))
  kl = (p_t * (np.log(p_t) - _np_log_softmax(s_logits / T))).sum(-1)
  expected_kd = (w * ((1 - alpha) * ce + alpha * T ** 2 * kl)).sum() / w.sum()
  obj_kd = distill.objective(cfg, tag_ids=tag_ids, tag_weight=TAG_WEIGHT,
                             teacher_cfg=teacher_cfg, alpha=alpha, temperature=T)
  m_kd = jax.device_get(obj_kd.metrics(jax.jit(obj_kd.sums)(
      params, {"teacher": teacher}, batch, jax.random.key(0))))
  assert_close(m_kd["loss"], expected_kd, rel=1e-5)
  assert_close(m_kd["kl"], (trained * kl).sum() / trained.sum(), rel=1e-4)


def _hf_tokenizer(tmp_path, think_special: bool) -> HFTokenizer:
  words = ["<unk>", "the", "answer", "is", "\n"]
  raw = RawHFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  raw.pre_tokenizer = pre_tokenizers.Whitespace()
  raw.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
  raw.add_tokens([AddedToken("<think>", special=think_special),
                  AddedToken("</think>", special=think_special)])
  raw.save(str(tmp_path / "tokenizer.json"))
  return HFTokenizer(str(tmp_path))


def test_think_tags_are_single_tokens_or_fail_clearly(tmp_path, tok):
  hf = _hf_tokenizer(tmp_path, think_special=False)  # as in Qwen3's tokenizer.json
  ids = distill.tag_token_ids(hf, "<think>, </think>")
  assert ids == (hf.token_to_id("<think>"), hf.token_to_id("</think>"))
  assert hf.encode("<think> the answer </think>")[0] == ids[0]
  # Marked special, the tag is split like text (encode never makes special ids from text).
  (tmp_path / "special").mkdir()
  with pytest.raises(ValueError, match=r"config.distill.tag_tokens: '<think>' encodes to \d+ "
                                       "tokens .* not one"):
    distill.tag_token_ids(_hf_tokenizer(tmp_path / "special", think_special=True), "<think>")
  with pytest.raises(ValueError, match=r"config.distill.tag_tokens: '<answer>' encodes to"):
    distill.tag_token_ids(tok, "<think>,<answer>")  # minimind's <answer> is text here


def test_reasoning_content_becomes_a_think_block():
  record = {"messages": [
      {"role": "user", "content": "Where was Li Ming born?"},
      {"role": "assistant", "content": "Hangzhou.", "reasoning_content": "Recall the bio.\n"}]}
  doc = formats.normalize(record, "chat", "text", "f.jsonl:1")
  assert doc["messages"][1]["content"] == "<think>\nRecall the bio.\n</think>\n\nHangzhou."
  assert reasoning.split(doc["messages"][1]["content"]) == ("Recall the bio.", "Hangzhou.")


@pytest.mark.parametrize("text,expected", [
    ("<think>\nA.\n</think>\n\nB.", ("A.", "B.")),
    ("B.", (None, "B.")),
    ("<think>\nstill thinking", ("still thinking", "")),  # cut by max_new_tokens
    ("A.\n</think>\nB.", ("A.", "B.")),  # the template opened <think> in the prompt
    ("Use <think> tags.", (None, "Use <think> tags.")),  # quoted, not a block
])
def test_split(text, expected):
  assert reasoning.split(text) == expected


@pytest.mark.parametrize("reply", ["<think>\nA b c.\n</think>\n\nThe answer.", "The answer."])
def test_stream_filter_shows_or_hides_reasoning(reply):
  for show_it, want in ((True, reply), (False, ("[thinking] " if "<think>" in reply else "")
                                        + "The answer.")):
    out = []
    f = show.StreamFilter(out.append, show=show_it)
    for k in range(0, len(reply), 3):  # deltas that split the tags
      f(reply[k:k + 3])
    assert "".join(out) == want


def test_one_shot_answers_and_chat_session_wrapper():
  recs = [{"prompt": "q", "answer": "<think>\nA.\n</think>\n\nB."}, {"prompt": "r", "answer": "C."}]
  hidden = show.split_answers(recs, show=False)
  assert hidden == [{"prompt": "q", "answer": "B.", "reasoning": "A."},
                    {"prompt": "r", "answer": "C."}]
  assert show.split_answers(recs, show=True)[0]["answer"] == recs[0]["answer"]

  class Session:  # the part of infer.session.ChatSession the CLI uses
    def reply(self, text, write=None, should_stop=None):
      assert should_stop == "passed on"
      for ch in "<think>x</think>Y":
        write(ch)
      return "gen"

    def reset(self):
      return "reset"

  out = []
  wrapped = show.wrap_session(Session(), show=False)
  assert wrapped.reply("hi", write=out.append, should_stop="passed on") == "gen"
  assert wrapped.reset() == "reset"
  assert "".join(out) == "[thinking] Y"


def test_distill_run_with_a_teacher(tmp_path, tok):
  tok_path = tok.save(str(tmp_path / "tok"))
  student = post_training_runs.make_init_run(str(tmp_path / "student"), tok_path, seed=0)
  teacher = post_training_runs.make_init_run(str(tmp_path / "teacher"), tok_path, seed=1,
                                             dim=48, n_layers=1, std=0.3)
  c = post_training_runs.small_config("", distill_config.get_config())
  c.init_from = student
  c.distill.teacher, c.distill.alpha = teacher, 0.5
  c.train.steps, c.train.warmup_steps, c.train.eval_every, c.train.eval_batches = 6, 1, 6, 2
  c.checkpoint.every, c.data.seq_len = 6, 256
  out = loop.train_and_evaluate(c, str(tmp_path / "distill"))
  assert out["step"] == 6 and out["kl"] > 0 and out["eval_kl"] > 0
  first, last = out["eval_history"]
  assert last["eval_loss"] < first["eval_loss"] and last["eval_ce"] < first["eval_ce"]
  assert math.isfinite(out["loss"]) and out["ce"] > 0
  with checkpoint.make_manager(str(tmp_path / "distill"), read_only=True) as m:
    assert set(m.item_metadata(6)["state"]) == {"step", "params", "opt_state"}  # no teacher
  # A teacher with another tokenizer (here: of the same size) is refused before training.
  other = tok_lib.train_sentencepiece(post_training_runs.corpus()[::-1], vocab_size=tok.vocab_size,
                                      model_type="unigram")
  assert other.vocab_size == tok.vocab_size
  c.distill.teacher = post_training_runs.make_init_run(
      str(tmp_path / "bad"), other.save(str(tmp_path / "tok2")))
  c.data.tokenizer.path = tok_path
  with pytest.raises(ValueError, match="uses another tokenizer than this run"):
    frozen.teacher_model_config(c, ModelConfig.from_config(c.model, vocab_size=tok.vocab_size))
