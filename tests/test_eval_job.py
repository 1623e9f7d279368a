"""The eval job on a tiny run directory (a real tokenizer, random weights saved as 3 checkpoints):
the sweep's files, overrides honoured or refused, packing=none against packed, multiple-choice
scores against a direct per-choice log-likelihood, knowledge scoring through a stub generator."""

import csv
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from configs import eval as eval_config
from configs import sft as sft_config
from llm_jax import fields as fields_lib
from llm_jax.data import pipeline
from llm_jax.data.builtin import bios, post
from llm_jax.data import tokenizer as tok_lib
from llm_jax.eval import choice as choice_lib
from llm_jax.eval import job, model_io, plots, run_config, tasks as tasks_lib
from llm_jax.infer.generate import Generation
from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder
from llm_jax import checkpoint, rundir
from llm_jax.model import init as model_init
from tests.model_reference import random_params
from tests.numerics import assert_close

STEPS = (10, 20, 30)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("run"))
  cfg = sft_config.get_config()
  cfg.data.synthetic.n_entities = 30
  cfg.data.seq_len = 128
  cfg.data.batch_size = 8
  corpus = sft_config.get_config().data
  corpus.synthetic.n_entities = 30
  corpus.train = "builtin:bios,builtin:bios_qa_train"
  tok = tok_lib.train_sentencepiece(pipeline.corpus_texts(corpus), vocab_size=700)
  tok.save(wd)
  cfg.data.tokenizer.path = os.path.join(wd, "tokenizer.model")
  cfg.model.update(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64,
                   vocab_size=tok.vocab_size, init_std=0.2)
  rundir.write_config(wd, cfg)
  model_cfg = ModelConfig.from_config(cfg.model)
  with checkpoint.make_manager(wd, keep=10, async_save=False, with_data=False) as m:
    for k, step in enumerate(STEPS):
      checkpoint.save(m, step, {"step": step, "params": random_params(model_cfg, seed=k)},
                      force=True)
    m.wait_until_finished()
  return wd


def _eval_cfg(**fields):
  c = eval_config.get_config()
  for path, value in fields.items():
    node = c
    *parents, leaf = path.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _set_fields(c):
  """The fields `_eval_cfg` set: those that differ from configs/eval.py's (what a command line
  names as --config.<field>=...)."""
  defaults = fields_lib.flatten(eval_config.get_config())
  return {k for k, v in fields_lib.flatten(c).items() if defaults.get(k) != v}


def _run(c, run_dir):
  return job.run_eval(c, run_dir, explicit=_set_fields(c))


def _resolve(c, run_dir, *named):
  return run_config.resolve(c, run_dir, _set_fields(c) | set(named))


def _is_png(path):
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
  with Image.open(path) as im:
    im.verify()
  with Image.open(path) as im:
    assert im.size[0] > 100 and im.size[1] > 100


def test_sweep_over_three_checkpoints_writes_jsons_table_and_plots(run_dir, tmp_path):
  out = str(tmp_path / "out")
  cfg = _eval_cfg(eval__tasks="loss,rouge,repetition,knowledge,choice", eval__steps="all",
                  eval__out_dir=out, eval__max_batches=2, eval__max_examples=3,
                  eval__max_new_tokens=6, eval__rep_prefix=8, eval__rep_continuation=10,
                  eval__knowledge_people=1, eval__batch_size=8)
  results = _run(cfg, run_dir)
  assert sorted(results) == list(STEPS)
  for step in STEPS:
    with open(os.path.join(out, f"eval_{step}.json"), encoding="utf-8") as f:
      res = json.load(f)
    assert set(res["tasks"]) == {"loss", "rouge", "repetition", "knowledge", "choice"}
    assert res["loss"] == res["tasks"]["loss"]["loss"] > 0 and res["step"] == step
    assert res["tasks"]["rouge"]["tokenizer"] == "auto"
    assert res["tasks"]["repetition"]["mode"] == "chat answers"
    assert res["tasks"]["knowledge"]["all"]["count"] == 2 * 6 * 2  # 2 groups x 6 attrs x 2 langs
    assert res["tasks"]["choice"]["questions"] == 3
  # Different weights per checkpoint: different losses.
  assert len({results[s]["loss"] for s in STEPS}) == 3
  with open(os.path.join(out, "summary.csv"), encoding="utf-8") as f:
    rows = list(csv.reader(f))
  assert [r[0] for r in rows[1:]] == ["10", "20", "30"] and "rouge.rougeL" in rows[0]
  md = open(os.path.join(out, "summary.md"), encoding="utf-8").read()
  assert "| 30 |" in md and "knowledge.qa_heldout.contains" in md
  assert "Pearson" not in md  # 3 checkpoints: too few for a correlation (summary.py)
  # Rouge's tokenisation beside its figures (issue 24): in summary.md and the console line
  assert "Rouge and BLEU: auto tokenisation: one token per CJK character" in md
  assert "(auto tokenisation: one token per CJK character" in job._brief(
      "rouge", results[30]["tasks"]["rouge"])
  # the loss line says what it scored, with the JSON's own counts (issue 24: "20 batches" on the
  # console, 35 in the JSON); documents as many as the per-document losses averaged
  loss = results[30]["tasks"]["loss"]
  assert loss["batches"] == 2 and loss["documents"] > 0
  assert job._brief("loss", loss).endswith(
      f"(2 batches, {loss['documents']:,} documents, {loss['tokens']:,.0f} tokens of "
      "builtin:bios_qa_heldout)")
  for task in ("loss", "rouge", "repetition", "knowledge", "choice"):
    _is_png(os.path.join(out, "plots", f"{task}.png"))
  if os.path.isdir("/usr/share/fonts/opentype/noto"):  # fonts-noto-cjk (.ci/run installs it)
    assert plots.cjk_font(), "a CJK font is installed but the plots do not use it"
  side = open(os.path.join(out, "samples", "chat_prompts.md"), encoding="utf-8").read()
  assert "## 李白是谁？" in side and all(f"| {s} |" in side for s in STEPS)

  # A later eval of one task adds to the checkpoint's JSON instead of replacing it.
  _run(_eval_cfg(eval__tasks="loss", eval__steps="20", eval__out_dir=out, eval__max_batches=1,
                 eval__plots=False), run_dir)
  with open(os.path.join(out, "eval_20.json"), encoding="utf-8") as f:
    res = json.load(f)
  assert res["tasks"]["loss"]["batches"] == 1 and "rouge" in res["tasks"]


def test_packing_none_scores_one_document_per_row_with_the_packed_loss(run_dir, tmp_path):
  common = dict(eval__steps="30", eval__plots=False, data__batch_size=4, data__seq_len=96)
  packed = _run(_eval_cfg(eval__out_dir=str(tmp_path / "p"), **common), run_dir)[30]
  none = _run(_eval_cfg(eval__out_dir=str(tmp_path / "n"), data__packing="none", **common),
              run_dir)[30]
  data = bios.generate(_resolve(_eval_cfg(), run_dir).data.synthetic)
  n_docs = len(data["qa_heldout"])
  # The overrides were used: 4 rows per batch of 96 tokens, one document per row unpacked.
  assert none["tasks"]["loss"]["batch_size"] == 4 and none["tasks"]["loss"]["seq_len"] == 96
  assert none["documents"] == packed["documents"] == n_docs
  assert none["batches"] == -(-n_docs // 4) > packed["batches"]
  assert abs(none["loss"] - packed["loss"]) <= 1e-5 * packed["loss"]
  assert abs(none["doc_mean_loss"] - packed["doc_mean_loss"]) <= 1e-5 * packed["doc_mean_loss"]
  assert none["tokens"] == packed["tokens"]


def test_overrides_are_honoured_or_refused_by_name(run_dir):
  # A field named on the command line counts even when it equals the eval default (256), and
  # beats the run's own value (128).
  assert _resolve(_eval_cfg(), run_dir).data.seq_len == 128
  assert _resolve(_eval_cfg(), run_dir, "data.seq_len").data.seq_len == 256
  merged = _resolve(_eval_cfg(data__packing="none", model__dtype="bfloat16"), run_dir)
  assert merged.data.packing == "none" and merged.model.dtype == "bfloat16"
  assert merged.model.dim == 32  # the shape is the run's
  for field, value in (("model__n_layers", 3), ("train__steps", 5),
                       ("data__tokenizer__vocab_size", 100), ("data__worker_count", 2)):
    with pytest.raises(ValueError, match=f"config.{field.replace('__', '.')}"):
      _run(_eval_cfg(**{field: value}), run_dir)
  with pytest.raises(ValueError, match="config.eval.steps='40'"):
    _run(_eval_cfg(eval__steps="40"), run_dir)


def _context(run_dir, **fields):
  cfg = _resolve(_eval_cfg(**fields), run_dir)
  from llm_jax import sharding  # pylint: disable=g-import-not-at-top
  tok = tok_lib.get_tokenizer(cfg.data.tokenizer, run_dir, corpus_fn=None)
  model_cfg = ModelConfig.from_config(cfg.model)
  mesh = sharding.make_mesh(cfg.mesh)
  rules = tuple(tuple(r) for r in cfg.sharding_rules)
  _, param_sh = model_init.abstract(model_cfg, mesh, rules)
  return tasks_lib.Context(cfg, run_dir, tok, model_cfg, mesh, rules, param_sh)


def test_choice_scores_equal_direct_per_choice_log_likelihood(run_dir, tmp_path):
  f = tmp_path / "mc.jsonl"
  f.write_text("\n".join(json.dumps(q, ensure_ascii=False) for q in [
      {"question": "Where was Li Na born?", "choices": ["Hangzhou", "Beijing", "Xi'an", "Wuhan"],
       "answer": 2},
      {"question": "李白是哪个朝代的诗人？", "A": "唐", "B": "宋", "C": "元", "D": "明", "answer": "A"},
      {"question": "What did Wang Wei study?", "choices": ["law", "music"], "answer": 1}]),
      encoding="utf-8")
  for fmt, shots in (("letters", 1), ("cloze", 0)):
    ctx = _context(run_dir, eval__choice_file=str(f), eval__choice_format=fmt,
                   eval__choice_shots=shots)
    params, _ = rundir.load_params(run_dir, 30)
    runner = model_io.ModelRunner(params, ctx.model_cfg, ctx.mesh, ctx.rules,
                                  model_io.make_score_fn(ctx.model_cfg, ctx.param_shardings,
                                                         ctx.mesh, ctx.rules), batch_size=4)
    task = tasks_lib.Choice(ctx)
    res, samples = task.run(runner)
    # Independent: each (context, choice) alone through the model, float64 log-softmax.
    apply = jax.jit(Decoder(ctx.model_cfg).apply)
    direct = []
    for i, q in enumerate(task.questions):
      text = choice_lib.context(q, choice_lib.shots_for(i, task.questions, [], shots), task.style,
                                fmt)
      lls = []
      for cont in choice_lib.continuations(q, fmt):
        c_ids, k_ids = choice_lib.encode_pair(ctx.tok, text, cont)
        n_ids = len(c_ids) + len(k_ids)
        # One unbatched sequence; zero padding after it (segment 0) cannot reach it causally and
        # keeps one compiled shape.
        ids = np.zeros((1, 256), np.int32)
        ids[0, :n_ids] = c_ids + k_ids
        pos = np.arange(256, dtype=np.int32)[None]
        seg = (pos < n_ids).astype(np.int32)
        logits = np.asarray(apply({"params": params}, ids, pos, seg), np.float64)[0]
        shifted = logits - logits.max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        n = len(c_ids)
        lls.append(sum(logp[t - 1, ids[0, t]] for t in range(n, n_ids)))
      direct.append(lls)
      assert_close(samples[i]["logliks"], lls, rel=1e-5)
    want = np.mean([int(np.argmax(d)) == q.answer for d, q in zip(direct, task.questions)])
    assert res["acc"] == pytest.approx(want) and res["questions"] == 3
    assert [s["predicted"] for s in samples] == ["ABCD"[int(np.argmax(d))] for d in direct]


class _StubRunner:
  """A 'model' whose answer to each prompt is given: the generation path without a network."""

  def __init__(self, answers_by_prompt):
    self.answers = answers_by_prompt

  def generate(self, prompts, sampling, **kw):
    return [Generation(tokens=[1], text=self.answers[tuple(p)], finish_reason="stop",
                       logprobs=None) for p in prompts]


def test_knowledge_task_right_model_100_wrong_model_0(run_dir):
  ctx = _context(run_dir, eval__knowledge_people=2)
  task = tasks_lib.Knowledge(ctx)
  right = {tuple(p): probe.reference for p, probe in zip(task.prompts, task.probes)}
  res, samples = task.run(_StubRunner(right))
  assert res["all"]["exact"] == res["all"]["contains"] == 1.0
  assert res["qa_heldout"]["contains"] == res["qa_trained"]["contains"] == 1.0
  assert res["training_lineage"][0].startswith("sft: builtin:bios_qa_train")
  wrong = {tuple(p): "不知道。I do not know." for p in task.prompts}
  res, _ = task.run(_StubRunner(wrong))
  assert res["all"]["exact"] == res["all"]["contains"] == 0.0
  # Another attribute's sentence of the same person is never an exact answer.
  shifted = {tuple(p): task.probes[i + 1 if i % 6 < 5 else i - 1].reference
             for i, p in enumerate(task.prompts)}
  res, _ = task.run(_StubRunner(shifted))
  assert res["all"]["exact"] == 0.0
  assert len(samples) == len(task.probes) and {"qa", "bio", "answer"} <= set(samples[0])


@pytest.mark.parametrize("split", ["dpo_heldout", "r1_heldout"])
def test_rouge_of_a_dpo_or_distill_run_reads_its_builtin_eval_set(run_dir, tmp_path, split):
  """A DPO run's data.eval is builtin:bios_dpo_heldout, a distillation run's
  builtin:bios_r1_heldout: rouge scores against them (a bare KeyError before the built-ins had
  one resolver). The references are the generator's own records: a pair's chosen answer, a
  trace's last assistant turn."""
  spec = f"builtin:bios_{split}"
  out = _run(_eval_cfg(eval__tasks="rouge", eval__steps="30", eval__out_dir=str(tmp_path),
                       eval__max_examples=3, eval__max_new_tokens=4, eval__plots=False,
                       data__eval=spec), run_dir)[30]
  res = out["tasks"]["rouge"]
  assert res["examples"] == 3 and res["references"] == spec and 0 <= res["rougeL"] <= 1
  cfg = _resolve(_eval_cfg(data__eval=spec), run_dir)
  records, _ = tasks_lib.read_references(spec, cfg.data, limit=3)
  raw = post.generate(cfg.data.synthetic)[split][:3]
  if split.startswith("dpo"):
    want = [r["chosen"][-1]["content"] for r in raw]
  else:
    want = [r["messages"][-1]["content"] for r in raw]
  assert [r["reference"] for r in records] == want
  assert all(r["messages"][-1]["role"] == "user" for r in records)


def test_repetition_prefixes_end_at_a_character_boundary(run_dir, tmp_path):
  """Issue 24: a text prefix of rep_prefix tokens could end inside a multi-byte character (a rare
  Chinese character is three byte-fallback tokens), which the samples showed as U+FFFD and the
  model was asked to continue from half a character. The prefix now ends at the last whole
  character within rep_prefix tokens. (The prefixes are cut when the task reads its data, before
  any model runs: the task is built, not run.)"""
  cfg = _resolve(_eval_cfg(eval__tasks="repetition", data__eval=str(tmp_path / "rare.jsonl"),
                           eval__rep_prefix=8, eval__chat_prompts=""), run_dir,
                 "data.eval", "eval.rep_prefix", "eval.chat_prompts")
  tok = rundir.load_tokenizer(run_dir, cfg)
  rare = "龘"  # not in the tiny vocabulary: one token per UTF-8 byte
  (tmp_path / "rare.jsonl").write_text(
      "".join(json.dumps({"text": rare * 12 + f" {i}"}) + "\n" for i in range(2)), encoding="utf-8")
  ids = tok.encode(rare * 12)
  assert len(ids) >= 36 and "\ufffd" in tok.decode(ids[:8])  # 8 tokens cut a character in two
  task = tasks_lib.Repetition(tasks_lib.Context(cfg, run_dir, tok, None, None, (), None))
  whole = max(k for k in range(1, 9) if "\ufffd" not in tok.decode(ids[:k]))
  assert whole < 8 and task.prompts == [ids[:whole]] * 2
  assert task.shown == [tok.decode(ids[:whole])] * 2 and "\ufffd" not in task.shown[0]
