"""A LoRA SFT job through the real loop: it starts from a base run (`init_from`), logs the memory
it saves, checkpoints the adapters only, resumes exactly, and every tool reads the run as base +
adapters."""

import logging
import os
import shutil

import numpy as np
import pytest
from flax import traverse_util

from configs import sft as sft_config
from llm_jax.data.tokenizer import train_sentencepiece
from llm_jax.model import lora
from llm_jax.model.config import ModelConfig
from llm_jax import checkpoint, rundir
from llm_jax.train import loop
from tests.model_reference import random_params
from tests.numerics import assert_close

CORPUS = [f"Who was person {i}? 李明宇 was born in 杭州 in 19{i % 90 + 10}." for i in range(200)]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """A base run directory as an import writes it: config.json, tokenizer, params checkpoint."""
  d = str(tmp_path_factory.mktemp("base"))
  tok = train_sentencepiece(CORPUS, vocab_size=300, model_type="bpe")
  tok.save(d)
  c = sft_config.get_config()
  c.model.update(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64, vocab_size=tok.vocab_size)
  c.data.tokenizer.path = os.path.join(d, "tokenizer.model")
  rundir.save_params(d, random_params(ModelConfig.from_config(c.model), std=0.05), c)
  return d


def lora_config(base_dir, steps=4):
  c = sft_config.get_config()
  c.init_from = base_dir
  c.lora.update(rank=4, alpha=8.0, dropout=0.1, targets="q,v,down,embed")
  c.data.seq_len, c.data.batch_size = 64, 4
  c.data.synthetic.n_entities = 40
  c.train.steps, c.train.warmup_steps, c.train.log_every, c.train.lr = steps, 1, 2, 1e-2
  c.train.eval_every, c.train.eval_batches = steps, 1
  c.checkpoint.every = 2
  return c


def _adapters(workdir, step):
  params, _ = rundir.load_params(workdir, step, merge_lora=False)
  return traverse_util.flatten_dict(params, sep="/")


def test_lora_sft_saves_adapters_only_resumes_exactly_and_reads_as_a_model(tmp_path, base_run,
                                                                           caplog):
  run_a = str(tmp_path / "a")
  with caplog.at_level(logging.INFO):
    out = loop.train_and_evaluate(lora_config(base_run), run_a)
  assert out["step"] == 4 and np.isfinite(out["eval_loss"])
  line = next(m for m in caplog.messages if m.startswith("LoRA rank 4"))
  assert "trainable parameters" in line and "for full fine-tuning" in line, line

  # The run records its base exactly; its checkpoints hold the adapters and their moments only.
  cfg = rundir.read_config(run_a)
  assert cfg.init_from == os.path.abspath(base_run) and cfg.init_step == 0
  with checkpoint.make_manager(run_a, read_only=True) as m:
    meta = m.item_metadata(4)[checkpoint.STATE]
  assert set(meta) == {"step", "params", "opt_state"}
  names = {k.split("/")[-1] for k in traverse_util.flatten_dict(meta["params"], sep="/")}
  assert names == {"lora_a", "lora_b"}
  adapters = _adapters(run_a, 4)
  model_cfg = ModelConfig.from_config(cfg.model)
  lcfg = lora.with_lora(model_cfg, lora.LoraConfig.from_config(cfg.lora))
  assert sum(x.size for x in adapters.values()) == lora.trainable_count(lcfg)

  # Preempted after step 2 and resumed (the base read again from init_from): the same adapters,
  # bit for bit, as the uninterrupted run.
  run_b = str(tmp_path / "b")
  shutil.copytree(run_a, run_b)
  shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(run_b), "4"))
  resumed = lora_config(base_run)
  resumed.train.eval_every = 0
  assert loop.train_and_evaluate(resumed, run_b)["step"] == 4
  for k, x in _adapters(run_b, 4).items():
    np.testing.assert_array_equal(x, adapters[k], err_msg=k)

  # Chat / generation / eval read the LoRA run as its base with the adapters merged in: an
  # adapted kernel is W + (alpha / rank) A @ B (float64 numpy here), the rest is the base.
  base, _ = rundir.load_params(base_run)
  loaded = rundir.load(run_a)
  assert loaded.model_cfg.lora is None and loaded.tokenizer.vocab_size == model_cfg.vocab_size
  a, b = adapters["layers/attn/q_proj/lora_a"], adapters["layers/attn/q_proj/lora_b"]
  w = np.asarray(base["layers"]["attn"]["q_proj"]["kernel"], np.float64)
  want = w + 2.0 * np.einsum("ldr,lrnh->ldnh", a.astype(np.float64), b.astype(np.float64))
  assert_close(loaded.params["layers"]["attn"]["q_proj"]["kernel"], want, rel=1e-6)
  np.testing.assert_array_equal(loaded.params["layers"]["attn"]["k_proj"]["kernel"],
                                base["layers"]["attn"]["k_proj"]["kernel"])
