"""The quick start's promise (README, issue 24): SFT alone teaches a 1M-parameter model the facts of
the people it was fine-tuned on, and nothing about the held-out people.

The README's run (configs/sft.py as it is: 100 people, each fact asked four ways, 300 steps) gets
99% of its trained people's questions right. Here the same config and code path, shortened to 10
people (8 trained, 2 held out) and 4-row batches of 128 tokens, still 300 steps: the number of
updates, not the epochs, is what the facts need (150 steps of 8 rows got 70%, 300 of 4 got 98%)."""

import os

from configs import eval as eval_config
from configs import sft as sft_config
from llm_jax.eval import job
from llm_jax.train import loop


def test_quick_start_answers_its_trained_people_and_not_the_held_out(tmp_path):
  c = sft_config.get_config()
  # The README's figures are for these settings; a change to them must re-measure the README.
  s = c.data.synthetic
  assert (s.n_entities, s.qa_phrasings, c.data.tokenizer.vocab_size, c.train.steps) == \
      (100, 4, 2048, 300)
  assert (c.model.dim, c.model.n_layers, c.train.lr) == (128, 4, 3e-3)
  s.n_entities = 10
  c.data.seq_len, c.data.batch_size = 128, 4
  c.train.warmup_steps, c.train.eval_every, c.checkpoint.every = 30, 0, 300
  workdir = str(tmp_path / "sft")
  loop.train_and_evaluate(c, workdir)

  e = eval_config.get_config()
  e.eval.tasks = "knowledge"
  result = job.run_eval(e, workdir, explicit=("eval.tasks",))[300]["tasks"]["knowledge"]
  trained, heldout = result["qa_trained"], result["qa_heldout"]
  assert trained["count"] == 8 * 6 * 2 and heldout["count"] == 2 * 6 * 2  # people x attrs x langs
  assert trained["contains"] >= 0.8, result
  assert heldout["contains"] <= 0.2, result
  assert os.path.isfile(os.path.join(workdir, "eval", "samples", "step_300_knowledge.jsonl"))
