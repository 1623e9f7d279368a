"""GRPO through the real loop on a tiny random model with a dense user reward: the sampler's
log-probs equal the trainer's (padded and packed rows), a run logs TRL's metric names and
resumes bit-exactly (same prompts, same sampling keys), LoRA trains only the adapters with the
base bit-identical, prompt sets and rewards fail with file/line messages."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import grpo as grpo_config
from llm_jax import checkpoint, jobs, rundir
from llm_jax.data import chat_template, prompts as prompts_lib, tokenizer as tok_lib
from llm_jax.data.builtin import arith
from llm_jax.infer.generate import Generator
from llm_jax.infer.sampling import SamplingConfig
from llm_jax.model.config import ModelConfig
from llm_jax.rl import rewards, rollout
from llm_jax.train import grpo
from tests.model_reference import random_params

SEQ_LEN, MAX_NEW = 96, 8


def corpus():
  return [chat_template.render_chat_text(r["messages"]) for r in arith.generate()["sft"][:400]]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """A run directory of a tiny random model with a tokenizer of the arithmetic task."""
  d = str(tmp_path_factory.mktemp("base"))
  tok = tok_lib.train_sentencepiece(corpus(), vocab_size=400)
  tok.save(d)
  c = grpo_config.get_config()
  c.model.update(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64, vocab_size=tok.vocab_size)
  c.data.tokenizer.path = os.path.join(d, tok_lib.MODEL_FILE)
  rundir.save_params(d, random_params(ModelConfig.from_config(c.model), std=0.3), c)
  return d


def grpo_cfg(base, steps=4, **grpo_fields):
  c = grpo_config.get_config()
  c.init_from = base
  c.data.seq_len, c.data.batch_size = SEQ_LEN, 8
  c.train.steps, c.train.warmup_steps, c.train.log_every, c.train.lr = steps, 1, 1, 1e-2
  c.train.eval_every = 0
  c.checkpoint.every = 2
  c.grpo.update(num_generations=4, max_new_tokens=MAX_NEW, rewards="tests.grpo_rewards:digits",
                eval_prompts="", kl_beta=0.1)
  c.grpo.update(grpo_fields)
  return c


def _loaded(base):
  cfg = rundir.read_config(base)
  tok = tok_lib.Tokenizer.load(rundir.tokenizer_path(base, cfg))
  params, _ = rundir.load_params(base)
  return ModelConfig.from_config(cfg.model), params, tok


def test_sampler_logps_equal_trainer_logps_padded_and_packed(base_run):
  cfg, params, tok = _loaded(base_run)
  ps = prompts_lib.load("builtin:arith_heldout", tok, SEQ_LEN - MAX_NEW)
  ids = [ps.ids[i].tolist() for i in range(6)]
  gens = Generator(params, cfg).generate(
      ids, [SamplingConfig(temperature=1.0, max_new_tokens=MAX_NEW, seed=i) for i in range(6)],
      stop_token_ids=[tok.im_end_id], decode_fn=tok.decode, return_logprobs=True)
  ended = [g.finish_reason == "stop" for g in gens]
  logps = jax.jit(grpo.policy_logps(cfg, 1.0))

  # Padded: one completion per row, as the rollout stage builds them.
  padded = rollout.build_rows(ids, [g.tokens for g in gens], ended, SEQ_LEN, tok.im_end_id)
  lp = np.asarray(logps(params, {}, padded))
  # Packed: rows 2k and 2k+1 in one row of twice the length (segment ids 1 and 2, positions
  # restarting), so attention must stay within each sequence.
  packed = {k: np.zeros((3, 2 * SEQ_LEN), v.dtype) for k, v in padded.items()}
  for k in range(3):
    off = 0
    for seg, r in enumerate((2 * k, 2 * k + 1), 1):
      n = int((padded["segment_ids"][r] > 0).sum())
      for key in packed:
        packed[key][k, off:off + n] = padded[key][r, :n]
      packed["segment_ids"][k, off:off + n] = seg
      off += n
  lp_packed = np.asarray(logps(params, {}, packed))
  diffs = []
  for r, (p, g) in enumerate(zip(ids, gens)):
    sampler = np.asarray(g.logprobs)
    diffs.append(np.abs(lp[r, len(p) - 1:len(p) - 1 + len(g.tokens)] - sampler).max())
    k, first = divmod(r, 2)
    off = 0 if first == 0 else int((padded["segment_ids"][r - 1] > 0).sum())
    got = lp_packed[k, off + len(p) - 1:off + len(p) - 1 + len(g.tokens)]
    diffs.append(np.abs(got - sampler).max())
  print(f"largest |sampler - trainer| log-prob difference: {max(diffs):.2e}")
  assert max(diffs) < 1e-4, diffs  # float32 noise (log-probs of a few nats)
  assert sum(len(g.tokens) for g in gens) > 20


@pytest.mark.slow  # two short runs through the loop: ~2 min on the shared 2-core box
def test_run_logs_trl_metrics_and_resumes_exactly(tmp_path, base_run):
  run_a = str(tmp_path / "a")
  out = jobs.run(grpo_cfg(base_run), run_a)
  assert out["step"] == 4
  for k in ("reward", "reward_std", "rewards/tests.grpo_rewards:digits/mean",
            "frac_reward_zero_std", "kl", "entropy", "clip_ratio/low_mean",
            "clip_ratio/high_mean", "completions/mean_length", "completions/clipped_ratio",
            "rollout_tokens_per_s", "train_tokens_per_s"):
    assert k in out and np.isfinite(out[k]), k
  assert out["kl"] > 0  # the policy moved away from the init_from reference
  params_a, _ = rundir.load_params(run_a, 4)

  # Killed after the checkpoint of step 2 and resumed: the same prompts and sampling keys, so the
  # same parameters bit for bit.
  run_b = str(tmp_path / "b")
  shutil.copytree(run_a, run_b)
  shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(run_b), "4"))
  out_b = jobs.run(grpo_cfg(base_run), run_b)
  assert out_b["step"] == 4 and out_b["reward"] == out["reward"]
  params_b, _ = rundir.load_params(run_b, 4)
  for (k, a), b in zip(traverse_util.flatten_dict(params_a, sep="/").items(),
                       traverse_util.flatten_dict(params_b, sep="/").values()):
    np.testing.assert_array_equal(a, b, err_msg=k)
  base, _ = rundir.load_params(base_run)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base),
                                                       jax.tree.leaves(params_a)))


@pytest.mark.slow  # a run through the loop: ~1 min on the shared 2-core box
def test_lora_trains_adapters_only_base_bit_identical(tmp_path, base_run):
  c = grpo_cfg(base_run, steps=2, loss="cispo", advantage="rloo")
  c.lora.update(rank=4, alpha=8.0, targets="q,v,down")
  run = str(tmp_path / "lora")
  out = jobs.run(c, run)
  assert out["step"] == 2 and np.isfinite(out["loss"])
  with checkpoint.make_manager(run, read_only=True) as m:
    meta = m.item_metadata(2)[checkpoint.STATE]
  names = {k.split("/")[-1] for k in traverse_util.flatten_dict(meta["params"], sep="/")}
  assert names == {"lora_a", "lora_b"}  # only adapters are trained and saved
  adapters, _ = rundir.load_params(run, 2, merge_lora=False)
  assert any(np.abs(v).max() > 0 for k, v in traverse_util.flatten_dict(adapters, sep="/").items()
             if k.endswith("lora_b"))  # B starts at 0: it moved
  # The base the run reads (its recorded init_from) is bit-identical to the source run.
  base, _ = rundir.load_params(base_run)
  cfg = rundir.read_config(run)
  again, _ = rundir.load_params(cfg.init_from, cfg.init_step)
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_prompt_set_errors_name_file_line_and_field(tmp_path, base_run):
  _, _, tok = _loaded(base_run)
  p = tmp_path / "p.jsonl"
  p.write_text('{"prompt": "1 + 1?", "answer": "2"}\n{"question": "x"}\n')
  with pytest.raises(ValueError, match=r"p.jsonl:2: no 'prompt' or 'messages'"):
    prompts_lib.load(str(p), tok, 50)
  p.write_text('{"prompt": "1 + 1?"}\n\n{"prompt": "' + "long words " * 40 + '"}\n')
  with pytest.raises(ValueError, match=r"p.jsonl:3: the prompt is \d+ tokens, over the 50"):
    prompts_lib.load(str(p), tok, 50)
  p.write_text('{"messages": [{"role": "user", "content": "hi"}, '
               '{"role": "assistant", "content": "yo"}]}\n')
  with pytest.raises(ValueError, match=r"p.jsonl:1: field 'messages' must end on a user turn"):
    prompts_lib.load(str(p), tok, 50)
  p.write_text('{"prompt": "3 + 4?", "answer": "7"}\n')
  ps = prompts_lib.load(str(p), tok, 50)
  assert ps.texts == ["3 + 4?"] and ps.records[0]["answer"] == "7"


def test_builtin_rewards():
  c = grpo_config.get_config().grpo
  c.rewards = "exact_answer,number,format,length_penalty"
  c.number_tolerance, c.max_new_tokens, c.overlong_buffer = 0.5, 10, 4
  r = rewards.from_config(c)
  comps = ["3 + 4 = 7. Answer: 7", "so <answer> 7.2 </answer>", "Answer: 8", "7"]
  total, per = r(["q"] * 4, comps, {"answer": ["7"] * 4, "completion_tokens": [3, 6, 8, 10]})
  assert per["exact_answer"] == [1.0, 0.0, 0.0, 1.0]
  assert per["number"] == [1.0, 1.0, 0.0, 1.0]
  assert per["format"] == [1.0, 0.0, 1.0, 0.0]
  assert per["length_penalty"] == [0.0, 0.0, -0.5, -1.0]
  assert total == [sum(v[i] for v in per.values()) for i in range(4)]
  with pytest.raises(ValueError, match="unknown reward 'nope'"):
    c.rewards = "nope"
    rewards.from_config(c)
  with pytest.raises(ValueError, match="cannot load 'tests.grpo_rewards:missing'"):
    c.rewards = "tests.grpo_rewards:missing"
    rewards.from_config(c)


@pytest.mark.slow  # two subprocess runs through the loop: ~2 min on the shared 2-core box
def test_sharded_grpo_equals_one_device(tmp_path, base_run):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  res = {}
  for n in ("1", "8"):
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
    if n == "8":
      env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    else:
      env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, os.path.join(root, "tests", "grpo_sharded_check.py"),
                          base_run, str(tmp_path / n), n], env=env, cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res[n] = json.loads(out.stdout.strip().splitlines()[-1])
  assert res["8"]["devices"] == 8 and res["1"]["devices"] == 1
  for s1, s8 in zip(res["1"]["steps"], res["8"]["steps"]):
    assert s1["tokens"] == s8["tokens"]  # the same completions sampled on both meshes
    np.testing.assert_allclose(s1["advantages"], s8["advantages"], rtol=0, atol=1e-6)
  assert any(np.abs(s["advantages"]).max() > 0 for s in res["1"]["steps"])  # a signal to learn
  assert abs(res["1"]["loss"] - res["8"]["loss"]) <= 1e-4 * max(abs(res["1"]["loss"]), 1e-3)
  p1, p8 = np.load(tmp_path / "1" / "params.npz"), np.load(tmp_path / "8" / "params.npz")
  for k in p1.files:  # per parameter, relative to its largest element
    assert np.abs(p1[k] - p8[k]).max() <= 1e-4 * np.abs(p1[k]).max(), k


@pytest.mark.slow  # SFT, GRPO and held-out evaluation, shrunk: a few minutes on the 2-core box
def test_demo_quick(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  work = tmp_path / "demo"
  out = subprocess.run([sys.executable, "-m", "llm_jax.rl.demo", "--quick",
                        f"--workdir={work}", "--seeds=0,1"], cwd=root,
                       env=dict(os.environ, PYTHONPATH=root), capture_output=True, text=True,
                       timeout=1200)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads((work / "summary.json").read_text())
  for run in ("before", "after"):
    assert len(summary[run]["pass@1"]) == 2 and len(summary[run]["pass@2"]) == 2
    assert all(0 <= v <= 1 for v in summary[run]["pass@1"] + summary[run]["pass@2"])
  assert [h["step"] for h in summary["eval_history"]] == [0, 2, 4]
  assert (work / "grpo_demo.png").stat().st_size > 10_000
  assert "SFT + GRPO: pass@1" in out.stdout
