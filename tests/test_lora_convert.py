"""LoRA runs out: the merged run directory equals the adapter model (float32, 1e-5), merging is
never applied twice, and the PEFT export loads with `peft` on the exported base in transformers
with the same logits (1e-4)."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from configs import base as base_config
from llm_jax.convert import merge_lora, peft_export
from llm_jax.data.tokenizer import train_sentencepiece
from llm_jax.model import lora
from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder
from llm_jax import checkpoint, rundir
from tests.model_reference import random_params
from tests.numerics import assert_close

CORPUS = [f"Alice {i} met 李明宇 in 杭州 and said hello world {i % 7} times." for i in range(200)]
TEXT = "Alice met 李明宇 in 杭州 and said hello"


@pytest.fixture(scope="module")
def tok():
  return train_sentencepiece(CORPUS, vocab_size=300, model_type="bpe")


def _make_runs(root, tok, family: str, targets: str, rank=4, alpha=12.0):
  """A base run (random weights) and a LoRA run on it (random adapters), as the trainer writes
  them: config.json + tokenizer + checkpoint; the LoRA run's params are its adapters."""
  config = base_config.get_config()
  config.model.update(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=80,
                      vocab_size=tok.vocab_size, rope_theta=1e6, rms_eps=1e-5,
                      tie_embeddings=family == "qwen2", qkv_bias=family == "qwen2")
  cfg = ModelConfig.from_config(config.model)
  params = jax.tree_util.tree_map_with_path(  # norm scales around 1, so every tensor matters
      lambda p, x: x + 1 if "scale" in jax.tree_util.keystr(p) else x, random_params(cfg, std=0.1))
  base_dir = os.path.join(root, f"{family}_base")
  tok.save(base_dir)
  config.data.tokenizer.path = os.path.join(base_dir, "tokenizer.model")
  rundir.save_params(base_dir, params, config)

  config.lora.update(rank=rank, alpha=alpha, targets=targets, dropout=0.1)
  config.init_from, config.init_step = base_dir, 0
  lcfg = lora.with_lora(cfg, lora.LoraConfig.from_config(config.lora))
  ids = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda r: Decoder(lcfg).init(r, ids, ids, ids + 1)["lora"],
                          jax.random.key(0))
  rng = np.random.default_rng(7)
  adapters = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.unbox().shape),
                                                jnp.float32), shapes,
                          is_leaf=lambda x: hasattr(x, "unbox"))
  lora_dir = os.path.join(root, f"{family}_lora")
  tok.save(lora_dir)
  config.data.tokenizer.path = os.path.join(lora_dir, "tokenizer.model")
  rundir.save_params(lora_dir, adapters, config, step=30)
  return base_dir, lora_dir, cfg, lcfg, params, adapters


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg, variables, ids_1xL):
  n = ids_1xL.shape[1]
  return Decoder(cfg).apply(variables, ids_1xL, jnp.arange(n)[None], jnp.ones((1, n), jnp.int32))[0]


def _logits(cfg, variables, ids):
  return np.asarray(_apply(cfg, variables, jnp.asarray([ids])))


def test_merged_run_equals_adapter_model_and_merging_twice_is_safe(tmp_path, tok):
  base_dir, lora_dir, cfg, lcfg, params, adapters = _make_runs(
      str(tmp_path), tok, "qwen2", "q,k,v,o,gate,up,down,embed")
  ids = tok.encode(TEXT)
  want = _logits(lcfg, {"params": params, "lora": adapters}, ids)
  assert np.abs(want - _logits(cfg, {"params": params}, ids)).max() > 0.1 * np.abs(want).max()

  out = merge_lora.merge_run(lora_dir, str(tmp_path / "merged"))
  merged, merged_cfg = rundir.load_params(out)
  assert merged_cfg.lora.rank == 0 and checkpoint.steps(out) == [30]
  assert os.path.isfile(os.path.join(out, "tokenizer.model"))
  assert_close(_logits(ModelConfig.from_config(merged_cfg.model), {"params": merged}, ids), want,
               rel=1e-5)
  # Every tool reads the LoRA run itself as base + adapters: the same merge, bit for bit.
  direct, _ = rundir.load_params(lora_dir)
  for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(merged)):
    np.testing.assert_array_equal(a, b)

  # Merging again: a no-op; merging the merged run: refused (it would add the adapters twice).
  files = sorted(os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs)
  mtimes = [os.path.getmtime(f) for f in files]
  assert merge_lora.merge_run(lora_dir, out) == out
  assert [os.path.getmtime(f) for f in files] == mtimes
  with pytest.raises(ValueError, match=r"was merged from .*lora.* already.*twice"):
    merge_lora.merge_run(out, str(tmp_path / "merged2"))
  with pytest.raises(ValueError, match=r"already holds a run"):  # another merge over this one
    merge_lora.merge_run(lora_dir, out, dtype="bfloat16")
  with pytest.raises(ValueError, match=r"is not a LoRA run"):
    merge_lora.merge_run(base_dir, str(tmp_path / "merged3"))
  again, _ = rundir.load_params(out)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(merged)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("family,targets", [
    ("llama", "q,k,v,o,gate,up,down,embed,lm_head"),  # untied head, its own adapter
    ("qwen2", "q,k,v,o,gate,up,down,embed"),  # tied: the adapted table is the head too
])
def test_peft_export_loads_in_peft_with_our_logits(tmp_path, tok, family, targets):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  _, lora_dir, cfg, lcfg, params, adapters = _make_runs(str(tmp_path), tok, family, targets)
  base_dir, adapter_dir = peft_export.export_peft(lora_dir, str(tmp_path / "export"))

  with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
    ac = json.load(f)
  modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
             "embed_tokens"} | ({"lm_head"} if family == "llama" else set())
  assert (ac["peft_type"], ac["task_type"], ac["r"], ac["lora_alpha"], ac["bias"]) == (
      "LORA", "CAUSAL_LM", 4, 12.0, "none")
  assert set(ac["target_modules"]) == modules
  with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), "numpy") as f:
    shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
  pre = "base_model.model.model.layers.1."
  assert shapes[pre + "self_attn.q_proj.lora_A.weight"] == [4, 48]
  assert shapes[pre + "self_attn.k_proj.lora_B.weight"] == [2 * 16, 4]
  assert shapes[pre + "self_attn.o_proj.lora_A.weight"] == [4, 4 * 16]
  assert shapes[pre + "mlp.down_proj.lora_B.weight"] == [48, 4]
  assert shapes["base_model.model.model.embed_tokens.lora_embedding_A"] == [4, tok.vocab_size]
  assert len(shapes) == 2 * (2 * 7 + 1 + 1)  # layers' projections, embedding, (tied) head
  assert shapes["base_model.model.lm_head.lora_B.weight"] == [tok.vocab_size, 4]

  hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
  model = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
  ids = tok.encode(TEXT)
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor([ids])).logits[0].numpy()
  ours = _logits(lcfg, {"params": params, "lora": adapters}, ids)
  assert np.abs(ours - _logits(cfg, {"params": params}, ids)).max() > 0.1 * np.abs(ours).max()
  assert_close(theirs, ours, rel=1e-4)
