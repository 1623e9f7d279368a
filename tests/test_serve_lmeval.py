"""lm-evaluation-harness's `local-completions` model scores a small multiple-choice task against the
server (loglikelihoods from echoed log-probs, tokens from the server's /tokenize), and the same task
scored directly by llm_jax's decoder gives the same accuracy and the same loglikelihoods."""

import json

import numpy as np
import pytest

from llm_jax import rundir
from llm_jax.model.decoder import Decoder
from llm_jax.serve.tokens import encode_raw
from tests import serve_testlib
from tests.numerics import assert_close

lm_eval = pytest.importorskip("lm_eval")

QUESTIONS = [
    ("Q: What is the capital of Mars?\nA:", [" Olympus City.", " Paris.", " The Moon Book.", " yellow and warm."], 0),
    ("Q: Who wrote the Moon Book?\nA:", [" A zorb.", " Ada Lin wrote the Moon Book in 1901.", " Olympus City.", " Nobody."], 1),
    ("Q: What colour is the sky on Venus?\nA:", [" green", " blue and cold", " yellow and warm", " seven"], 2),
    ("Q: How many legs does a zorb have?\nA:", [" two", " seven legs and two tails", " none", " 1901"], 1),
    ("问：火星的首都是什么？\n答：", ["奥林匹斯城。", "巴黎。", "月亮之书。", "七条腿。"], 0),
    ("问：谁写了月亮之书？\n答：", ["火星。", "一只小机器人。", "林艾达在一九零一年写了月亮之书。", "黄色。"], 2),
    ("Tell me a story.", [" Once upon a time a small robot learned to sing.", " The end.", " Paris is big.", " 7"], 0),
    ("The sky on Venus is", [" yellow and warm.", " made of cheese.", " a zorb.", " Ada Lin."], 0),
]


@pytest.fixture(scope="session")
def served(tmp_path_factory):
  yield serve_testlib.session_server(tmp_path_factory)
  serve_testlib.stop_session_server()


def _direct_loglikelihoods(run, pairs) -> list[float]:
  """sum log p(continuation | context) of each (context, continuation) from one forward pass of
  llm_jax's decoder (no cache, no server; right padding in its own segment), split into tokens as
  lm-eval does: encode(context + continuation) after encode(context)."""
  tok = run.tokenizer
  wholes = [encode_raw(tok, c + x) for c, x in pairs]
  n_ctx = [len(encode_raw(tok, c)) for c, _ in pairs]
  length = max(len(w) for w in wholes)
  ids = np.zeros((len(wholes), length), np.int32)
  seg = np.zeros_like(ids)
  for r, w in enumerate(wholes):
    ids[r, :len(w)], seg[r, :len(w)] = w, 1
  pos = np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape)
  logits = np.asarray(Decoder(run.model_cfg).apply({"params": run.params}, ids, pos, seg), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  return [float(sum(logp[r, i - 1, w[i]] for i in range(n, len(w)))) for r, (w, n) in enumerate(zip(wholes, n_ctx))]


def test_lm_eval_local_completions_matches_direct_scoring(served, tmp_path, monkeypatch):
  from lm_eval import simple_evaluate  # pylint: disable=g-import-not-at-top
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top

  data = tmp_path / "mc.jsonl"
  data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}, ensure_ascii=False) + "\n"
                          for q, c, a in QUESTIONS), encoding="utf-8")
  (tmp_path / "serve_mc.yaml").write_text(f"""task: serve_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""", encoding="utf-8")
  for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    monkeypatch.setenv(var, "1")
  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
  monkeypatch.setenv("OPENAI_API_KEY", serve_testlib.API_KEY)  # local-completions' Bearer token

  results = simple_evaluate(
      model="local-completions",
      model_args={"model": "sft", "base_url": served["url"] + "/v1/completions", "tokenizer_backend": "remote",
                  "auth_token": serve_testlib.API_KEY, "max_length": serve_testlib.SEQ_LEN, "num_concurrent": 4,
                  "max_retries": 1},
      tasks=["serve_mc"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False), log_samples=True,
      num_fewshot=0, batch_size=1, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
  acc = results["results"]["serve_mc"]["acc,none"]
  assert 0.0 <= acc <= 1.0

  run = rundir.load(served["runs"]["sft"])
  direct_all = _direct_loglikelihoods(run, [(q, c) for q, choices, _ in QUESTIONS for c in choices])
  direct_correct = []
  for sample in sorted(results["samples"]["serve_mc"], key=lambda s: s["doc_id"]):
    q, choices, answer = QUESTIONS[sample["doc_id"]]
    direct = direct_all[4 * sample["doc_id"]:4 * sample["doc_id"] + 4]
    served_ll = [r[0] for r in sample["filtered_resps"]]
    assert_close(np.array(served_ll), np.array(direct), rel=1e-4)
    direct_correct.append(int(np.argmax(direct)) == answer)
  assert acc == pytest.approx(np.mean(direct_correct))
  assert acc >= 0.75  # the run learned these facts: the scores are not chance
