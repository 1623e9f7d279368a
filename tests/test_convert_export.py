"""Hugging Face export of a model trained here: transformers loads it with no custom code and
continues greedily token for token like our decoder; AutoTokenizer encodes like our
SentencePiece tokenizer and apply_chat_template renders our ChatML."""

import json
import os
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
from safetensors import safe_open

from configs import base
from llm_jax.convert import hf_export, sp_to_hf
from llm_jax.data.chat_template import encode_chat, render_chat_text
from llm_jax.data.tokenizer import train_sentencepiece
from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder
from llm_jax import rundir
from tests.numerics import assert_close

_BASE = ["李明宇于1965年3月12日出生在杭州，毕业于浙江大学物理系。",
         "The quick brown fox jumps over the lazy dog 42 times.",
         "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)",
         "臺灣的繁體字也要無損。", "She said: \"hello, world!\" and left.",
         "    indented   code  with   spaces", "数据科学与机器学习 machine learning 2024",
         "<think>reasoning here</think> answer", "emoji time 🙂🚀 ok"]
PROBES = ["混合 Chinese/English 文本 with emoji 🙂🚀 and code: x = [i**2 for i in range(10)]  # 注释\n\tdone",
          "  leading spaces and trailing  ", "李明宇 studied 物理 in 1985年!!", "ok\n\n\nthree newlines",
          "ß ﬁ ｆｕｌｌ ｗｉｄｔｈ", "<think>t</think> final"]
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "李明宇 was born where?"},
            {"role": "assistant", "content": "In 杭州 🙂."},
            {"role": "user", "content": "And when?"}]


def _corpus(n=300) -> list[str]:
  rng = random.Random(0)
  return [" ".join(rng.sample(_BASE, 2)) + f" item {i}" for i in range(n)]


@pytest.fixture(scope="module")
def sp_tok():
  return train_sentencepiece(_corpus(), vocab_size=500, model_type="bpe")


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_converted_sentencepiece_encodes_like_sentencepiece(tmp_path, model_type):
  tok = train_sentencepiece(_corpus(), vocab_size=500, model_type=model_type)
  hf = sp_to_hf.convert(tok.save(str(tmp_path)))
  for text in PROBES + _corpus()[:60]:
    ids = tok.encode(text)
    assert hf.encode(text, add_special_tokens=False).ids == ids, text
    assert hf.decode(ids, skip_special_tokens=False) == text


def _run(tmp_path, tok, family: str):
  """A workdir holding a randomly initialised (and perturbed) llm_jax model + our tokenizer."""
  config = base.get_config()
  config.model.update(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=24, mlp_dim=96,
                      vocab_size=tok.vocab_size, rope_theta=1e6, rms_eps=1e-5,
                      tie_embeddings=family != "llama", qkv_bias=family == "qwen2",
                      qk_norm=family == "qwen3")
  cfg = ModelConfig.from_config(config.model)
  ids = jnp.zeros((1, 1), jnp.int32)
  # The tree comes from our Decoder (eval_shape: no compile); values are random everywhere, norm
  # scales around 1 and biases non-zero, so every tensor matters.
  shapes = jax.eval_shape(lambda k: nn.unbox(Decoder(cfg).init(k, ids, ids, ids + 1)["params"]),
                          jax.random.key(0))
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.asarray((1.0 if "scale" in str(path[-1]) else 0.0)
                                  + 0.1 * rng.standard_normal(x.shape), x.dtype), shapes)
  workdir = str(tmp_path / f"run_{family}")
  rundir.save_params(workdir, params, config)
  tok.save(workdir)
  return workdir, params, cfg


def _our_greedy(params, cfg, prompt: list[int], n: int) -> list[int]:
  """Argmax continuation with no cache: the whole sequence is re-run for each token (one
  compiled shape: the row is padded to its final length with segment id 0)."""
  total = len(prompt) + n
  apply = jax.jit(lambda p, i, q, s: Decoder(cfg).apply({"params": p}, i, q, s))
  seq = list(prompt)
  positions = jnp.arange(total)[None]
  for _ in range(n):
    inputs = jnp.asarray([seq + [0] * (total - len(seq))], jnp.int32)
    segments = jnp.asarray([[1] * len(seq) + [0] * (total - len(seq))], jnp.int32)
    logits = apply(params, inputs, positions, segments)
    seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  return seq[len(prompt):]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_exported_model_generates_like_ours(tmp_path, sp_tok, family):
  workdir, params, cfg = _run(tmp_path, sp_tok, family)
  out = hf_export.export_hf(workdir, str(tmp_path / "hf"))
  with open(os.path.join(out, "config.json")) as f:
    hf_cfg = json.load(f)
  assert hf_cfg["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                      "qwen3": "Qwen3ForCausalLM"}[family]]
  model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  assert model.dtype == torch.float32

  prompt = sp_tok.encode("李明宇 studied physics in 杭州")
  with torch.no_grad():
    ref = model(input_ids=torch.tensor([prompt])).logits[0].numpy()
  n = len(prompt)
  ours = Decoder(cfg).apply({"params": params}, jnp.asarray([prompt]), jnp.arange(n)[None],
                            jnp.ones((1, n), jnp.int32))
  assert_close(np.asarray(ours[0]), ref, rel=1e-4)

  new = 16
  with torch.no_grad():
    hf_ids = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                            attention_mask=torch.ones(1, n, dtype=torch.long))[0, n:].tolist()
  greedy = _our_greedy(params, cfg, prompt, new)
  stops = set(model.generation_config.eos_token_id)
  assert stops == {sp_tok.im_end_id, sp_tok.eos_id}
  cut = next((k + 1 for k, t in enumerate(greedy) if t in stops), new)  # HF stops at eos
  assert hf_ids == greedy[:cut]
  if family == "qwen3":  # our KV-cache generator agrees too (once per test run: it compiles)
    generate = pytest.importorskip("llm_jax.infer.generate")
    sampling = pytest.importorskip("llm_jax.infer.sampling")
    out_ids = generate.Generator(params, cfg).generate(
        [prompt], sampling.SamplingConfig(temperature=0.0, max_new_tokens=new))[0].tokens
    assert out_ids == greedy


def test_exported_minimind_moe_loads_in_transformers_with_the_same_logits(tmp_path, sp_tok):
  """minimind's MoE (no q/k norm, an ungated shared expert) has no transformers class of its own;
  it is written as Qwen2-MoE with a zero shared-expert gate and a doubled shared down projection,
  which computes exactly the same. Every other layer is sparse (dense MLPs between)."""
  config = base.get_config()
  config.model.update(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=80,
                      vocab_size=sp_tok.vocab_size, rope_theta=1e6, rms_eps=1e-5, tie_embeddings=True,
                      scan_layers=True)
  config.model.moe.update(n_experts=4, top_k=2, expert_mlp_dim=48, n_shared_experts=1, every=2)
  cfg = ModelConfig.from_config(config.model)
  ids = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda k: nn.unbox(Decoder(cfg).init(k, ids, ids, ids + 1)["params"]),
                          jax.random.key(0))
  rng = np.random.default_rng(2)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.asarray((1.0 if "scale" in str(path[-1]) else 0.0)
                                  + 0.1 * rng.standard_normal(x.shape), x.dtype), shapes)
  workdir = str(tmp_path / "run_moe")
  rundir.save_params(workdir, params, config)
  sp_tok.save(workdir)
  out = hf_export.export_hf(workdir, str(tmp_path / "hf"))
  with open(os.path.join(out, "config.json")) as f:
    hf_cfg = json.load(f)
  assert hf_cfg["architectures"] == ["Qwen2MoeForCausalLM"] and hf_cfg["qkv_bias"] is False
  assert (hf_cfg["num_experts"], hf_cfg["decoder_sparse_step"], hf_cfg["shared_expert_intermediate_size"]) == (4, 2, 48)
  with safe_open(os.path.join(out, "model.safetensors"), framework="numpy") as h:
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in h.keys()
    assert "model.layers.0.mlp.gate_proj.weight" in h.keys()  # layer 0 is dense
    np.testing.assert_array_equal(h.get_tensor("model.layers.1.mlp.shared_expert_gate.weight"), 0)
  model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  prompt = sp_tok.encode("李明宇 studied physics in 杭州")
  with torch.no_grad():
    ref = model(input_ids=torch.tensor([prompt])).logits[0].numpy()
  n = len(prompt)
  ours = Decoder(cfg).apply({"params": params}, jnp.asarray([prompt]), jnp.arange(n)[None],
                            jnp.ones((1, n), jnp.int32))
  assert_close(np.asarray(ours[0]), ref, rel=1e-4)


def test_exported_tokenizer_encodes_and_templates_like_ours(tmp_path, sp_tok):
  workdir, _, _ = _run(tmp_path, sp_tok, "llama")
  out = hf_export.export_hf(workdir, str(tmp_path / "hf"))
  assert os.path.isfile(os.path.join(out, "tokenizer.model"))
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  for text in PROBES:
    assert hf_tok.encode(text, add_special_tokens=False) == sp_tok.encode(text), text
  text = hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
  assert text == render_chat_text(MESSAGES) + "<|im_start|>assistant\n"
  assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n")
  ids = hf_tok(text, add_special_tokens=False)["input_ids"]
  assert ids == encode_chat(sp_tok, MESSAGES, add_generation_prompt=True)[0].tolist()
  assert hf_tok.eos_token == "<|im_end|>" and hf_tok.pad_token_id == sp_tok.pad_id


def test_transform_hook_sees_params_before_writing(tmp_path, sp_tok):
  workdir, params, _ = _run(tmp_path, sp_tok, "qwen3")

  def double_final_norm(p, config):
    assert config.model.qk_norm
    return {**p, "final_norm": {"scale": 2 * p["final_norm"]["scale"]}}

  out = hf_export.export_hf(workdir, str(tmp_path / "hf"), transform_params=double_final_norm,
                            max_shard_bytes=20_000)
  assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    where = json.load(f)["weight_map"]["model.norm.weight"]
  with safe_open(os.path.join(out, where), framework="numpy") as h:
    np.testing.assert_array_equal(h.get_tensor("model.norm.weight"),
                                  2 * np.asarray(params["final_norm"]["scale"]))
