"""Helpers for the DPO and distillation tests: a small tokenizer and run directories of tiny
random models that `config.init_from` (or a distillation teacher) can point at, made without a
training run."""

import os

import jax

from configs import sft as sft_config
from llm_jax.data import chat_template, tokenizer as tok_lib
from llm_jax.data.builtin import bios
from llm_jax.model.config import ModelConfig
from llm_jax import rundir
from tests.model_reference import random_params

N_ENTITIES = 40


def corpus(n_entities: int = N_ENTITIES) -> list[str]:
  """Biographies and QA chats of the embedded encyclopedia, plus reasoning-shaped text."""
  cfg = sft_config.get_config().data.synthetic
  cfg.n_entities = n_entities
  cfg.qa_phrasings = 1  # these tests were sized on one chat per fact (the quick start asks 4)
  data = bios.generate(cfg)
  return ([r["text"] for r in data["bios"]] +
          [chat_template.render_chat_text(r["messages"]) for r in data["qa_train"]] +
          ["<think>\nThe question asks for it. The encyclopedia says: so the answer is\n"
           "</think>\n\n问题问的是百科中写道所以答案是"] * 20)


def make_tokenizer(directory: str, vocab_size: int = 600) -> str:
  tok = tok_lib.train_sentencepiece(corpus(), vocab_size=vocab_size)
  return tok.save(directory)


def small_config(tokenizer_path: str, config=None, dim: int = 32, n_layers: int = 2):
  c = config or sft_config.get_config()
  c.model.dim, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = dim, n_layers, 4, 2
  c.model.mlp_dim = 2 * dim
  c.data.seq_len, c.data.batch_size = 128, 8
  c.data.synthetic.n_entities = N_ENTITIES
  c.data.synthetic.qa_phrasings = 1
  c.data.tokenizer.path = tokenizer_path
  c.train.log_every, c.checkpoint.every = 10, 1000
  return c


def make_init_run(workdir: str, tokenizer_path: str, *, seed: int = 0, dim: int = 32,
                  n_layers: int = 2, std: float = 0.02) -> str:
  """A run directory holding random parameters of a tiny model (config.json, tokenizer, one
  params-only checkpoint), as `llm_jax.convert.hf_import` writes for an imported model."""
  c = small_config(tokenizer_path, dim=dim, n_layers=n_layers)
  tok = tok_lib.Tokenizer.load(tokenizer_path)
  tok.save(workdir)
  with c.unlocked():
    c.model.vocab_size = tok.vocab_size
    c.data.tokenizer.path = os.path.join(workdir, tok_lib.MODEL_FILE)
  params = random_params(ModelConfig.from_config(c.model), seed=seed, std=std)
  rundir.save_params(workdir, jax.device_get(params), c)
  return workdir
