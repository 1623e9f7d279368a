"""What the notebooks call besides the jobs: overrides checked by name (llm_jax.notebook), TensorBoard
scalars read back (llm_jax.eval.curves), and the Markdown tables, against hand-written values."""

import json
import os

import numpy as np
import pytest

from llm_jax import notebook
from llm_jax.config_check import ConfigError
from llm_jax.eval import curves


def test_overrides_set_nested_fields_and_refuse_unknown_names_or_wrong_types():
  c = notebook.config("sft", "tiny", {"model.dim": 64, "train.lr": 1e-2,
                                      "data.synthetic.n_entities": 60, "train.steps": 7})
  assert (c.model.dim, c.train.lr, c.data.synthetic.n_entities, c.train.steps) == (64, 1e-2, 60, 7)
  assert c.job == "sft" and c.data.train == "builtin:bios_qa_train"
  with pytest.raises(ValueError, match=r"OVERRIDES: 'model.dimm' is not a config field; "
                                       r"did you mean 'model.dim'\?"):
    notebook.config("sft", None, {"model.dimm": 64})
  with pytest.raises(ValueError, match=r"OVERRIDES: 'model' is not a config field"):
    notebook.config("sft", None, {"model": {"dim": 64}})
  with pytest.raises(ValueError, match=r"OVERRIDES: train.lr='fast' does not fit the field "
                                       r"\(it holds float 0.003\)"):
    notebook.config("sft", None, {"train.lr": "fast"})
  with pytest.raises(ConfigError, match="train.steps"):  # validated like the command line
    notebook.config("sft", None, {"train.steps": 0})
  with pytest.raises(ValueError, match="no configs/sfft.py"):
    notebook.config("sfft")


def test_read_scalars_gives_back_what_the_loop_writer_wrote_the_later_value_winning(tmp_path):
  from clu import metric_writers  # pylint: disable=g-import-not-at-top (imports TensorFlow)
  run = str(tmp_path / "run")
  w = metric_writers.SummaryWriter(os.path.join(run, "tensorboard"))
  for step, loss in ((1, 5.0), (2, 4.0), (3, 3.5)):
    w.write_scalars(step, {"loss": loss, "lr": 0.1 * step})
  w.write_scalars(3, {"eval_loss": 4.25})
  w.close()
  # A resumed run: a second event file that logs step 3 again.
  w = metric_writers.SummaryWriter(os.path.join(run, "tensorboard"))
  w.write_scalars(3, {"loss": 3.25})
  w.write_scalars(4, {"loss": 3.0})
  w.close()
  got = curves.read_scalars(run)
  assert sorted(got) == ["eval_loss", "loss", "lr"]
  np.testing.assert_array_equal(got["loss"][0], [1, 2, 3, 4])
  np.testing.assert_allclose(got["loss"][1], [5.0, 4.0, 3.25, 3.0], rtol=1e-7)
  np.testing.assert_allclose(got["lr"][1], [0.1, 0.2, 0.3], rtol=1e-6)
  np.testing.assert_array_equal(got["eval_loss"][0], [3])

  png = curves.plot_runs({"a": run, "b": run}, ["loss", "eval_loss"],
                                    str(tmp_path / "c.png"), title="t")
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match=r"no run logged \['accuracy'\]"):
    curves.plot_runs({"a": run}, ["accuracy"], str(tmp_path / "d.png"))
  with pytest.raises(FileNotFoundError, match="not a training run directory"):
    curves.read_scalars(str(tmp_path))


def test_eval_tables_put_each_checkpoint_in_a_column():
  def res(rep, contains):
    return {"tasks": {
        "repetition": {"greedy": {"seq_rep_4": rep, "loop_share": 0.0}, "rep_16": 0.5},
        "knowledge": {"all": {"exact": 0.25, "contains": contains, "count": 8},
                      "qa_heldout": {"exact": 0.0, "contains": contains / 2, "count": 4}}}}
  md = notebook.eval_tables({200: res(0.1, 0.5), 100: res(0.4, 0.25)})
  lines = md.splitlines()
  assert "|  | step 100 | step 200 |" in lines
  assert "| greedy answers: share of repeated 4-grams | 0.400 | 0.100 |" in lines
  assert "| rep/16 (next token repeats one of the last 16) | 0.500 | 0.500 |" in lines
  assert "| every probe | 0.250 / 0.250 (n=8) | 0.500 / 0.250 (n=8) |" in lines
  assert "| held-out people (QA never trained on) | 0.125 / 0.000 (n=4) | 0.250 / 0.000 (n=4) |" in lines
  assert not any("rep/128" in l or "biography" in l for l in lines)  # absent figures: no row


def test_knowledge_answers_line_up_the_runs_question_by_question(tmp_path):
  probes = [("Q1?", "A1", "heldout"), ("Q2?", "A2", "trained"), ("Q3?", "A|3", "heldout")]
  for run, answers in (("a", ["A1 yes", "no", "A|3"]), ("b", ["x", "y", "z"])):
    d = tmp_path / run / "eval" / "samples"
    d.mkdir(parents=True)
    for step, suffix in ((10, " old"), (20, "")):  # the latest step is read
      rows = [{"question": q, "reference": ref, "answer": a + suffix, "qa": qa,
               "contains": ref in a + suffix, "exact": False}
              for (q, ref, qa), a in zip(probes, answers)]
      (d / f"step_{step}_knowledge.jsonl").write_text(
          "".join(json.dumps(r) + "\n" for r in rows))
  md = notebook.knowledge_answers({"A": str(tmp_path / "a"), "B": str(tmp_path / "b")}, n=5)
  assert md.splitlines() == [
      "| question | reference | A | B |", "|---|---|---|---|",
      "| Q1? | A1 | ✅ A1 yes | ❌ x |",
      "| Q3? | A\\|3 | ✅ A\\|3 | ❌ z |"]
  with pytest.raises(FileNotFoundError, match="no knowledge samples"):
    notebook.knowledge_answers({"C": str(tmp_path)})


def test_params_table_counts_what_the_model_allocates():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from llm_jax import sharding  # pylint: disable=g-import-not-at-top
  from llm_jax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from llm_jax.model.decoder import Decoder  # pylint: disable=g-import-not-at-top
  c = notebook.config("sft", None, {"model.dim": 32, "model.n_layers": 2, "model.n_heads": 4,
                                    "model.n_kv_heads": 2, "model.mlp_dim": 64,
                                    "model.vocab_size": 100})
  cfg = ModelConfig.from_config(c.model)
  rules = tuple(tuple(r) for r in c.sharding_rules)
  mesh = sharding.make_mesh(c.mesh)
  md = notebook.params_table(cfg, mesh, rules)
  ids = jnp.zeros((1, 1), jnp.int32)
  real = nn.unbox(Decoder(cfg).init(jax.random.key(0), ids, ids, jnp.ones_like(ids))["params"])
  mib = sum(np.asarray(x).nbytes for x in jax.tree.leaves(real)) / 2**20
  assert f"{mib:.2f} MiB of parameters in all, {mib:.2f} MiB on each of the 1 devices" in md
  assert "| `embed/embedding` | (100, 32) | float32 |" in md
  assert notebook.rules_table((("embed", "fsdp"), ("act_batch", ("data", "fsdp")),
                               ("norm", None))).splitlines()[2:] == [
                                   "| `embed` | fsdp |", "| `act_batch` | data x fsdp |",
                                   "| `norm` | replicated |"]
