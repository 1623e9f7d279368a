"""Hugging Face import: logits of imported Llama / Qwen2 / Qwen3 models match transformers', and
import -> export gives back every tensor bit for bit.

The reference is transformers itself (torch, CPU, float32) on tiny random models built here.
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers

from configs import base
from llm_jax.convert import hf_config, hf_export, hf_import
from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder
from llm_jax import rundir
from tests.numerics import assert_close

# (family, config overrides): GQA and MHA, tied and untied, q/k/v bias, q/k norm, rope theta 1e4
# and 1e6, head dims that are not powers of two (24, 40) or not dim // n_heads.
CASES = {
    "llama_gqa_untied": ("llama", dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                                       intermediate_size=96, rope_theta=1e4,
                                       tie_word_embeddings=False)),
    "llama_mha_tied_hd24": ("llama", dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
                                          head_dim=24, intermediate_size=80, rope_theta=1e6,
                                          tie_word_embeddings=True)),
    "qwen2_bias_tied_hd40": ("qwen2", dict(hidden_size=80, num_attention_heads=2, num_key_value_heads=1,
                                           intermediate_size=112, rope_theta=1e6,
                                           tie_word_embeddings=True)),
    "qwen3_qknorm_untied_hd24": ("qwen3", dict(hidden_size=64, num_attention_heads=4,
                                               num_key_value_heads=2, head_dim=24,
                                               intermediate_size=96, rope_theta=1e4,
                                               tie_word_embeddings=False)),
}
# Mixture of experts: Qwen3-MoE (2 layers, 8 experts, top 2, renormalised), and Qwen2-MoE with a
# gated shared expert where only every 2nd of 4 layers is sparse (the others dense MLPs).
MOE_CASES = {
    "qwen3_moe": ("qwen3_moe", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=8, intermediate_size=48, moe_intermediate_size=24,
                                    num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                    rope_theta=1e4, tie_word_embeddings=False)),
    "qwen2_moe_shared_every2": ("qwen2_moe", dict(hidden_size=32, num_attention_heads=4,
                                                  num_key_value_heads=2, intermediate_size=48,
                                                  moe_intermediate_size=24, num_experts=6,
                                                  num_experts_per_tok=2, norm_topk_prob=False,
                                                  shared_expert_intermediate_size=40,
                                                  decoder_sparse_step=2, num_hidden_layers=4,
                                                  rope_theta=1e6, tie_word_embeddings=True)),
}
VOCAB = 160
CONFIG_CLASSES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
                  "qwen2_moe": "Qwen2MoeConfig", "qwen3_moe": "Qwen3MoeConfig"}
MODEL_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def _tiny_tokenizer_json(path: str):
  """A word-level tokenizer.json: import only copies it, so its contents barely matter."""
  vocab = {f"w{i}": i for i in range(VOCAB - 3)}
  vocab.update({"<|endoftext|>": VOCAB - 3, "<|im_start|>": VOCAB - 2, "<|im_end|>": VOCAB - 1})
  tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(path)


def build_hf_model(family: str, overrides: dict, out_dir: str, seed: int = 0, **save_kw):
  """A random float32 transformers model (norm scales and biases random too), saved to out_dir."""
  torch.manual_seed(seed)
  kw = dict(vocab_size=VOCAB, num_hidden_layers=2, rms_norm_eps=1e-5, max_position_embeddings=128,
            attn_implementation="eager")
  kw.update(overrides)
  config = getattr(transformers, CONFIG_CLASSES[family])(**kw)
  model = getattr(transformers, MODEL_CLASSES[family])(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.08 * torch.randn_like(p))
  model.save_pretrained(out_dir, **save_kw)
  _tiny_tokenizer_json(os.path.join(out_dir, "tokenizer.json"))
  return model


def hf_logits(model, ids: list[int]) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def our_logits(params, cfg: ModelConfig, inputs, positions, segment_ids) -> np.ndarray:
  fn = jax.jit(lambda p, i, q, s: Decoder(cfg).apply({"params": p}, i, q, s))
  return np.asarray(fn(params, jnp.asarray(inputs), jnp.asarray(positions), jnp.asarray(segment_ids)))


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  out = {}
  for i, (name, (family, overrides)) in enumerate({**CASES, **MOE_CASES}.items()):
    d = str(tmp_path_factory.mktemp(name))
    # The Qwen3 case is saved in several shards to exercise model.safetensors.index.json.
    save_kw = dict(max_shard_size="40KB") if family == "qwen3" else {}
    out[name] = (build_hf_model(family, overrides, d, seed=i, **save_kw), d)
  return out


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(hf_models, tmp_path, case, scan_layers):
  model, hf_dir = hf_models[case]
  workdir = str(tmp_path / "run")
  hf_import.import_hf(hf_dir, workdir, base.get_config(), scan_layers=scan_layers)
  params, config = rundir.load_params(workdir)
  cfg = ModelConfig.from_config(config.model)
  assert cfg.scan_layers == scan_layers
  assert config.data.tokenizer.path == os.path.join(workdir, "tokenizer")
  assert os.path.isfile(os.path.join(workdir, "tokenizer", "tokenizer.json"))

  rng = np.random.default_rng(0)
  doc_a, doc_b = rng.integers(0, VOCAB, 7).tolist(), rng.integers(0, VOCAB, 9).tolist()
  L = 20  # two documents packed in one row, then padding
  inputs = np.zeros((2, L), np.int32)
  positions = np.zeros((2, L), np.int32)
  segments = np.zeros((2, L), np.int32)
  inputs[0, :16] = doc_a + doc_b
  positions[0, :16] = list(range(7)) + list(range(9))
  segments[0, :16] = [1] * 7 + [2] * 9
  inputs[1, :7] = doc_a  # and the first document alone in the second row
  positions[1, :7] = range(7)
  segments[1, :7] = 1
  ours = our_logits(params, cfg, inputs, positions, segments)

  ref_a, ref_b = hf_logits(model, doc_a), hf_logits(model, doc_b)
  assert_close(ours[0, :7], ref_a, rel=1e-4)
  assert_close(ours[0, 7:16], ref_b, rel=1e-4)
  assert_close(ours[1, :7], ref_a, rel=1e-4)
  assert np.abs(ref_a).max() > 0.05  # the comparison is not between two near-zero arrays


@pytest.mark.parametrize("case,scan_layers", [("qwen3_moe", True), ("qwen3_moe", False),
                                               ("qwen2_moe_shared_every2", True)])
def test_moe_logits_and_generation_match_transformers(hf_models, tmp_path, case, scan_layers):
  """Packed documents and padding, as above; then KV-cache greedy generation against
  transformers' generate (the scanned Qwen2-MoE case: blocks of a dense and a sparse layer)."""
  model, hf_dir = hf_models[case]
  workdir = str(tmp_path / "run")
  hf_import.import_hf(hf_dir, workdir, base.get_config(), scan_layers=scan_layers)
  params, config = rundir.load_params(workdir)
  cfg = ModelConfig.from_config(config.model)
  assert cfg.moe.n_experts == model.config.num_experts and cfg.moe.top_k == 2
  assert cfg.n_sparse_layers == 2  # Qwen3-MoE: both layers; Qwen2-MoE: layers 1 and 3 of 4
  rng = np.random.default_rng(1)
  doc_a, doc_b = rng.integers(0, VOCAB, 6).tolist(), rng.integers(0, VOCAB, 9).tolist()
  inputs = np.zeros((1, 18), np.int32)
  inputs[0, :15] = doc_a + doc_b
  positions = np.zeros_like(inputs)
  positions[0, :15] = list(range(6)) + list(range(9))
  segments = np.zeros_like(inputs)
  segments[0, :15] = [1] * 6 + [2] * 9
  ours = our_logits(params, cfg, inputs, positions, segments)
  assert_close(ours[0, :6], hf_logits(model, doc_a), rel=1e-4)
  assert_close(ours[0, 6:15], hf_logits(model, doc_b), rel=1e-4)
  if case == "qwen2_moe_shared_every2":
    from llm_jax.infer import generate, sampling  # pylint: disable=g-import-not-at-top
    new = 8
    with torch.no_grad():
      want = model.generate(torch.tensor([doc_b]), max_new_tokens=new, do_sample=False,
                            attention_mask=torch.ones(1, len(doc_b), dtype=torch.long),
                            eos_token_id=None, pad_token_id=0)[0, len(doc_b):].tolist()
    got = generate.Generator(params, cfg, min_bucket=8).generate(
        [doc_a, doc_b], sampling.SamplingConfig(temperature=0.0, max_new_tokens=new))
    assert got[1].tokens == want


def _tensors(out_dir: str) -> dict[str, np.ndarray]:
  tensors = {}
  for f in sorted(os.listdir(out_dir)):
    if f.endswith(".safetensors"):
      with safe_open(os.path.join(out_dir, f), framework="numpy") as h:
        tensors.update({k: h.get_tensor(k) for k in h.keys()})
  return tensors


@pytest.mark.parametrize("case", ["qwen2_bias_tied_hd40", "qwen3_qknorm_untied_hd24", *MOE_CASES])
def test_import_export_round_trip_is_exact(hf_models, tmp_path, case):
  model, hf_dir = hf_models[case]
  workdir, out = str(tmp_path / "run"), str(tmp_path / "export")
  hf_import.import_hf(hf_dir, workdir, base.get_config())
  hf_export.export_hf(workdir, out)
  src, dst = _tensors(hf_dir), _tensors(out)
  assert sorted(src) == sorted(dst)
  for name, x in src.items():
    assert dst[name].dtype == x.dtype, name
    np.testing.assert_array_equal(dst[name], x, err_msg=name)
  with open(os.path.join(hf_dir, "config.json")) as f:
    src_cfg = json.load(f)
  with open(os.path.join(out, "config.json")) as f:
    dst_cfg = json.load(f)
  assert dst_cfg["model_type"] == src_cfg["model_type"]
  assert dst_cfg["max_position_embeddings"] == src_cfg["max_position_embeddings"]
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
  assert type(reloaded).__name__ == type(model).__name__
  ids = list(range(1, 12))
  np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(model, ids))


def test_bf16_checkpoint_imports_without_loss(tmp_path):
  family, overrides = CASES["llama_gqa_untied"]
  model = build_hf_model(family, overrides, str(tmp_path / "f32"))
  model.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
  _tiny_tokenizer_json(str(tmp_path / "bf16" / "tokenizer.json"))
  config = hf_import.import_hf(str(tmp_path / "bf16"), str(tmp_path / "run"), base.get_config())
  assert config.model.param_dtype == "bfloat16"
  params, _ = rundir.load_params(str(tmp_path / "run"))
  w = model.model.layers[1].mlp.down_proj.weight.detach().to(torch.bfloat16).float().numpy()
  got = np.asarray(params["layers"]["mlp"]["down_proj"]["kernel"][1].astype(jnp.float32))
  np.testing.assert_array_equal(got, w.T)


@pytest.mark.parametrize("field,value,family", [
    ("rope_scaling", {"rope_type": "dynamic", "factor": 8.0}, "llama"),
    ("rope_parameters", {"rope_type": "longrope", "factor": 4.0, "rope_theta": 1e6}, "qwen2"),
    ("mlp_only_layers", [0], "qwen3_moe"),
    ("use_sliding_window", True, "qwen2"),
    ("attention_bias", True, "llama"),
    ("mlp_bias", True, "llama"),
    ("num_experts", 8, "qwen3"),
    ("model_type", "mistral", "llama"),
    ("hidden_act", "gelu", "llama"),
])
def test_unsupported_configs_are_refused_naming_the_field(field, value, family):
  hf = {"model_type": family, "hidden_size": 48, "num_attention_heads": 4, "num_hidden_layers": 2,
        "intermediate_size": 96, "vocab_size": 100, field: value}
  if family.endswith("_moe"):
    hf.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)
  with pytest.raises(ValueError, match=field.split(".")[0]):
    hf_config.model_fields_from_hf(hf, "x/config.json")


def test_unexpected_tensor_is_refused(tmp_path):
  family, overrides = CASES["llama_gqa_untied"]
  build_hf_model(family, overrides, str(tmp_path / "hf"))
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "hf" / "model.safetensors")
  tensors = load_file(path)
  tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(48, np.float32)
  save_file(tensors, path, metadata={"format": "pt"})
  with pytest.raises(ValueError, match="o_proj.bias"):
    hf_import.import_hf(str(tmp_path / "hf"), str(tmp_path / "run"), base.get_config())
  assert not os.path.exists(tmp_path / "run")  # refused before anything was written


def test_missing_safetensors_leaves_no_workdir(tmp_path):
  family, overrides = CASES["llama_gqa_untied"]
  build_hf_model(family, overrides, str(tmp_path / "hf"))
  os.remove(tmp_path / "hf" / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="no \\*.safetensors files"):
    hf_import.import_hf(str(tmp_path / "hf"), str(tmp_path / "run"), base.get_config())
  assert not os.path.exists(tmp_path / "run")


_MESH_SCRIPT = r"""
import os, sys
import numpy as np, jax
import test_convert_import as T
from configs import base
from llm_jax import sharding
from llm_jax.convert import hf_import
from llm_jax.model.config import ModelConfig
from llm_jax import rundir
from llm_jax.model import init as model_init
d = sys.argv[1]
T.build_hf_model(*T.CASES["qwen3_qknorm_untied_hd24"], d + "/hf")
config = base.get_config()
config.mesh.fsdp, config.mesh.tensor = 2, 2
mesh = sharding.make_mesh(config.mesh)
sharded = hf_import.import_hf(d + "/hf", d + "/sharded", base.get_config(), mesh=mesh)
hf_import.import_hf(d + "/hf", d + "/single", base.get_config())
_, shardings = model_init.abstract(
    ModelConfig.from_config(sharded.model), mesh, sharded.sharding_rules)
p, _ = rundir.load_params(d + "/sharded", shardings=shardings)
ref, _ = rundir.load_params(d + "/single")
q = p["layers"]["attn"]["q_proj"]["kernel"]
assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None), q.sharding
assert q.addressable_shards[0].data.shape == (2, 32, 2, 24), q.addressable_shards[0].data.shape
jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p, ref)
print("OK")
"""


def test_import_onto_a_mesh_matches_single_device(tmp_path):
  """Tensors go straight into their NamedShardings (8 virtual CPU devices, in a subprocess)."""
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=os.pathsep.join([root, os.path.join(root, "tests")]))
  r = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, str(tmp_path)], env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
