"""Scaled RoPE (linear, llama3, yarn): the frequencies equal transformers' ROPE_INIT_FUNCTIONS, and
imported Llama models with rope_scaling give transformers' logits at positions far beyond the
original context (reached through position ids, not long sequences); export writes it back."""

import dataclasses
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp

from configs import base
from llm_jax.convert import hf_export, hf_import
from llm_jax.model.config import ModelConfig, RopeScaling
from llm_jax.model.decoder import Decoder
from llm_jax.model.layers import rope_frequencies
from llm_jax import rundir
from tests.numerics import assert_close
from tests.test_convert_import import build_hf_model

# Llama-3.2-1B's rope_scaling, a linear factor 4 and Qwen's yarn settings (factor 4 on 2048).
SCALINGS = {
    "llama3": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048},
}
# A first position well past each original context (8192 for llama3, 2048 x 4 for the others).
FAR = {"llama3": 20_000, "linear": 9_000, "yarn": 7_000}


def _hf_frequencies(params: dict, head_dim: int, theta: float):
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # pylint: disable=g-import-not-at-top
  config = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                                    max_position_embeddings=8192,
                                    rope_parameters={"rope_theta": theta, **params})
  inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
  return inv_freq.numpy(), attention_factor


@pytest.mark.parametrize("params", [
    SCALINGS["llama3"], SCALINGS["linear"], SCALINGS["yarn"],
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 16.0,
     "beta_slow": 2.0, "truncate": False},
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
     "mscale_all_dim": 0.8},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096, "attention_factor": 1.3},
], ids=["llama3", "linear", "yarn", "yarn_untruncated", "yarn_mscale", "yarn_attention_factor"])
@pytest.mark.parametrize("head_dim,theta", [(64, 5e5), (24, 1e4)])
def test_frequencies_equal_transformers(params, head_dim, theta):
  want, want_factor = _hf_frequencies(params, head_dim, theta)
  fields = {k: v for k, v in params.items() if k != "rope_type"}
  got, factor = rope_frequencies(head_dim, theta, RopeScaling(type=params["rope_type"], **fields))
  assert_close(np.asarray(got), want, rel=1e-6)
  assert factor == pytest.approx(want_factor, rel=1e-12)


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_scaled_llama_imports_and_matches_transformers_far_beyond_its_context(tmp_path, kind):
  overrides = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   intermediate_size=96, rope_theta=5e5, tie_word_embeddings=True,
                   max_position_embeddings=131072, rope_scaling=dict(SCALINGS[kind]))
  hf_dir = str(tmp_path / "hf")
  model = build_hf_model("llama", overrides, hf_dir)
  # (refused before scaled RoPE existed)
  config = hf_import.import_hf(hf_dir, str(tmp_path / "run"), base.get_config())
  assert config.model.rope_scaling.type == kind
  params, config = rundir.load_params(str(tmp_path / "run"))
  cfg = ModelConfig.from_config(config.model)

  ids = np.random.default_rng(0).integers(0, 160, 12).tolist()
  forward = lambda c: jax.jit(lambda p, q: Decoder(c).apply(
      {"params": p}, jnp.asarray([ids]), q[None], jnp.ones((1, len(ids)), jnp.int32))[0])
  ours = forward(cfg)
  for start in (3, FAR[kind]):
    positions = np.arange(start, start + len(ids)).tolist()
    with torch.no_grad():
      want = model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([positions])).logits[0].numpy()
    got = ours(params, jnp.asarray(positions))
    assert_close(np.asarray(got), want, rel=1e-4, err_msg=f"positions from {start}")
  # The comparison can fail: unscaled RoPE misses transformers' logits by far more than 1e-4.
  other = forward(dataclasses.replace(cfg, rope_scaling=RopeScaling()))(params, jnp.asarray(positions))
  assert np.abs(np.asarray(other) - want).max() > 10 * 1e-4 * np.abs(want).max()

  if kind == "llama3":  # export writes the same rope_parameters; transformers reloads the model
    out = hf_export.export_hf(str(tmp_path / "run"), str(tmp_path / "export"))
    with open(os.path.join(out, "config.json")) as f:
      exported = json.load(f)
    assert exported["rope_parameters"] == {"rope_theta": 5e5, **SCALINGS["llama3"]}
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    with torch.no_grad():
      again = reloaded(input_ids=torch.tensor([ids]), position_ids=torch.tensor([positions])).logits[0].numpy()
    np.testing.assert_array_equal(again, want)


def test_bad_rope_scaling_names_the_field():
  with pytest.raises(ValueError, match="rope_scaling.original_max_position_embeddings"):
    ModelConfig(vocab_size=8, dim=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8, mlp_dim=8,
                rope_scaling=RopeScaling(type="llama3", factor=8.0)).validate()
  with pytest.raises(ValueError, match="rope_scaling.type"):
    ModelConfig(vocab_size=8, dim=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8, mlp_dim=8,
                rope_scaling=RopeScaling(type="ntk")).validate()
