"""DPO: the loss against a float64 numpy formula, packed pairs against each sequence run alone,
log 2 and zero rewards when the reference is the policy, and a short run through the real loop
(two microbatches per step) that learns preferences on held-out pairs."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dpo as dpo_config
from llm_jax.data import pipeline, preference, tokenizer as tok_lib
from llm_jax.data.builtin import bios
from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder
from llm_jax import checkpoint
from llm_jax.train import dpo, loop
from tests import post_training_runs
from tests.model_reference import random_params
from tests.numerics import assert_close

def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def np_dpo_losses(pc, pr, rc, rr, beta, label_smoothing=0.0, loss_type="sigmoid"):
  """The papers' formulas in float64: DPO (Rafailov et al.), conservative DPO, IPO (Azar et al.)."""
  z = (pc - pr) - (rc - rr)
  if loss_type == "ipo":
    return (z - 1.0 / (2.0 * beta)) ** 2
  return (-(1 - label_smoothing) * _log_sigmoid(beta * z)
          - label_smoothing * _log_sigmoid(-beta * z))


@pytest.mark.parametrize("beta,label_smoothing,loss_type", [
    (0.1, 0.0, "sigmoid"), (0.5, 0.2, "sigmoid"), (2.0, 0.0, "sigmoid"), (0.1, 0.0, "ipo"),
    (0.7, 0.0, "ipo")])
def test_pair_loss_equals_float64_formula(beta, label_smoothing, loss_type):
  # Hand-made per-pair log-probabilities: ties, both signs, and a margin of 400 nats (beta * z
  # far in the sigmoid's tail, where a naive log(sigmoid) would return -inf).
  pc = np.array([-10.0, -52.5, -3.25, -80.0, -7.0, -1.0])
  pr = np.array([-12.0, -50.0, -3.25, -480.0, -9.5, -401.0])
  rc = np.array([-11.0, -51.0, -4.0, -90.0, -7.0, -2.0])
  rr = np.array([-11.5, -52.0, -3.0, -85.0, -9.5, -1.5])
  losses, chosen_r, rejected_r = dpo.pair_losses(
      *(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)), beta=beta,
      label_smoothing=label_smoothing, loss_type=loss_type)
  assert_close(losses, np_dpo_losses(pc, pr, rc, rr, beta, label_smoothing, loss_type), rel=1e-6)
  assert_close(chosen_r, beta * (pc - rc), rel=1e-6)
  assert_close(rejected_r, beta * (pr - rr), rel=1e-6)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tok_lib.Tokenizer.load(post_training_runs.make_tokenizer(
      str(tmp_path_factory.mktemp("tok"))))


def _pairs(people):
  """Bilingual preference pairs: the answer in the question's language is chosen, the same fact
  in the other language rejected. Learnable only by conditioning on the prompt."""
  out = []
  for p in people:
    for a in bios.ATTRIBUTES:
      for lang, other in (("zh", "en"), ("en", "zh")):
        out.append({
            "conversations": [{"from": "human",
                               "value": bios.QUESTIONS[lang][a][0].format(name=p["name"][lang])}],
            "chosen": {"from": "gpt", "value": bios.BIO_TEMPLATES[lang][a][0].format(
                name=p["name"][lang], v=p[a][lang])},
            "rejected": {"from": "gpt", "value": bios.BIO_TEMPLATES[other][a][0].format(
                name=p["name"][other], v=p[a][other])}})
  return out


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
  """Train / held-out pair files in LLaMA-Factory's shape (as ../shared/data/dpo)."""
  d = tmp_path_factory.mktemp("pairs")
  cfg = dpo_config.get_config().data.synthetic
  cfg.n_entities = post_training_runs.N_ENTITIES
  people = bios.generate(cfg)["people"]
  paths = []
  for name, part in (("train", people[:30]), ("heldout", people[30:])):
    paths.append(str(d / f"{name}.json"))
    with open(paths[-1], "w", encoding="utf-8") as f:
      json.dump(_pairs(part), f, ensure_ascii=False, indent=1)
  return paths


def _batch(tok, path, seq_len=256, batch_size=4):
  c = dpo_config.get_config()
  c.data.train, c.data.seq_len, c.data.batch_size = path, seq_len, batch_size
  return next(pipeline.make_train_iterator(c.data, tok, seed=0))


def _model_cfg(tok):
  return ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=8, mlp_dim=64, tie_embeddings=False)


def test_packed_pairs_equal_each_sequence_alone(tok, pair_files):
  cfg = _model_cfg(tok)
  batch = _batch(tok, pair_files[0])
  assert (batch["segment_ids"].max(axis=1) >= 4).all()  # several pairs share each row
  policy, ref = random_params(cfg, seed=0, std=0.3), random_params(cfg, seed=1, std=0.3)
  beta = 0.3

  # Reference: every sequence alone (right-padded, its own segment), float64 log-softmax.
  L = batch["inputs"].shape[1]
  alone = jax.jit(lambda p, ids, n: Decoder(cfg).apply(
      {"params": p}, ids, jnp.arange(L)[None], (jnp.arange(L) < n)[None].astype(jnp.int32)))

  def logp(params, row, idx):
    ids = np.zeros((1, L), np.int32)
    ids[0, :len(idx)] = batch["inputs"][row][idx]
    logits = np.asarray(alone(params, ids, len(idx)), np.float64)[0, :len(idx)]
    logits = logits - logits.max(-1, keepdims=True)
    logsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    w = batch["loss_weights"][row][idx]
    tgt = batch["targets"][row][idx]
    return float((logsm[np.arange(len(idx)), tgt] * w).sum()), float(w.sum())

  per_pair = []  # (policy chosen, policy rejected, ref chosen, ref rejected, n chosen, n rejected)
  for row in range(batch["inputs"].shape[0]):
    for ci, ri in preference.pair_layout(batch["segment_ids"][row]):
      (pc, nc), (pr, nr) = logp(policy, row, ci), logp(policy, row, ri)
      (rc, _), (rr, _) = logp(ref, row, ci), logp(ref, row, ri)
      per_pair.append((pc, pr, rc, rr, nc, nr))
  pc, pr, rc, rr, nc, nr = np.array(per_pair).T
  assert len(per_pair) == float(dpo.count_pairs(batch))

  jitted = {}
  for loss_type, label_smoothing in (("sigmoid", 0.1), ("ipo", 0.0)):
    obj = dpo.objective(cfg, beta=beta, label_smoothing=label_smoothing, loss_type=loss_type)
    jitted[loss_type] = obj, jax.jit(obj.sums)
    sums = jax.device_get(jitted[loss_type][1](policy, {"reference": ref}, batch,
                                               jax.random.key(0)))
    # IPO compares log-probs averaged over each response's tokens.
    a, b, c, d = ((pc / nc, pr / nr, rc / nc, rr / nr) if loss_type == "ipo" else
                  (pc, pr, rc, rr))
    assert sums["pairs"] == len(per_pair)
    assert_close(sums["loss"], np_dpo_losses(a, b, c, d, beta, label_smoothing, loss_type).sum(),
                 rel=1e-5, err_msg=loss_type)
    assert_close(sums["logps_chosen"], a.sum(), rel=1e-5)
    assert_close(sums["logps_rejected"], b.sum(), rel=1e-5)
    assert_close(sums["rewards_chosen"], beta * (a - c).sum(), rel=1e-4)
    assert_close(sums["rewards_rejected"], beta * (b - d).sum(), rel=1e-4)
    assert sums["rewards_correct"] == np.sum(a - c > b - d)

  # Step 0 of a run: the reference is the policy. Loss log 2 per pair (whatever the label
  # smoothing), rewards 0, no pair "won".
  obj, sums_fn = jitted["sigmoid"]
  m = jax.device_get(obj.metrics(sums_fn(policy, {"reference": policy}, batch, jax.random.key(0))))
  assert_close(m["loss"], math.log(2), rel=1e-6)
  assert m["rewards/chosen"] == m["rewards/rejected"] == m["rewards/accuracies"] == 0.0


def test_short_run_learns_heldout_preferences(tmp_path, tok, pair_files):
  tok_path = tok.save(str(tmp_path / "tok"))
  init = post_training_runs.make_init_run(str(tmp_path / "init"), tok_path)
  c = post_training_runs.small_config("", dpo_config.get_config())
  c.init_from = init
  c.data.train, c.data.eval = pair_files
  c.train.steps, c.train.lr, c.train.warmup_steps, c.train.eval_every = 20, 3e-3, 3, 10
  c.train.schedule, c.train.grad_accum = "constant", 2  # microbatches of whole pairs
  c.checkpoint.every = 20
  out = loop.train_and_evaluate(c, str(tmp_path / "dpo"))
  first, mid, last = out["eval_history"]
  # Step 0: the policy is the reference, on all 120 held-out pairs.
  assert first["eval_pairs"] == 120
  assert_close(first["eval_loss"], math.log(2), rel=1e-6)
  assert first["eval_rewards/margins"] == 0.0 and first["eval_rewards/accuracies"] == 0.0
  # Then it prefers the held-out chosen answers, by a growing margin.
  assert last["eval_rewards/accuracies"] > 0.75, out["eval_history"]
  assert 0 < mid["eval_rewards/margins"] < last["eval_rewards/margins"], out["eval_history"]
  assert last["eval_loss"] < math.log(2)
  assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"} <= set(out)
  # The checkpoint holds what trains, not the reference (re-read from init_from on resume).
  with checkpoint.make_manager(str(tmp_path / "dpo"), read_only=True) as m:
    assert set(m.item_metadata(20)["state"]) == {"step", "params", "opt_state"}
  assert any(n.startswith("events.out") for n in os.listdir(tmp_path / "dpo" / "tensorboard"))


def test_lora_dpo_trains_adapters_against_the_base_as_reference(tmp_path, tok, pair_files):
  """With LoRA the reference is the frozen base itself (no second copy): at step 0 the adapters
  are zero, so the loss is log 2; the adapters alone then learn the preferences."""
  tok_path = tok.save(str(tmp_path / "tok"))
  init = post_training_runs.make_init_run(str(tmp_path / "init"), tok_path)
  c = post_training_runs.small_config("", dpo_config.get_config())
  c.init_from = init
  c.data.train, c.data.eval = pair_files
  c.lora.rank, c.lora.alpha = 8, 16.0
  c.train.steps, c.train.lr, c.train.warmup_steps, c.train.eval_every = 20, 1e-2, 3, 20
  c.train.schedule = "constant"
  c.checkpoint.every = 20
  out = loop.train_and_evaluate(c, str(tmp_path / "dpo"))
  first, last = out["eval_history"]
  assert_close(first["eval_loss"], math.log(2), rel=1e-6)
  assert last["eval_rewards/accuracies"] > 0.6, out["eval_history"]
  assert last["eval_loss"] < math.log(2)
  with checkpoint.make_manager(str(tmp_path / "dpo"), read_only=True) as m:
    saved = m.item_metadata(20)["state"]
  assert set(saved) == {"step", "params", "opt_state"}
  # What was saved is the adapters (rank 8 matrices), not a copy of the base.
  assert all(8 in leaf.shape for leaf in jax.tree.leaves(
      saved["params"], is_leaf=lambda x: hasattr(x, "shape")))
