"""LoRA on the decoder: parameter counts, the adapted forward against a float64 numpy reference,
B = 0 is the base, dropout only on the adapter path, a train step moves only the adapters."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from configs import base as base_config
from llm_jax import config_check, sharding
from llm_jax.model import lora
from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder
from llm_jax.train import state as state_lib
from llm_jax.model import init as model_init
from tests.model_reference import random_params, reference_logits
from tests.numerics import assert_close

jax.config.update("jax_default_matmul_precision", "highest")

# Unrolled layers (the numpy reference reads layers_i); GQA, a head_dim that is not dim/heads.
UNTIED = ModelConfig(vocab_size=61, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=12,
                     mlp_dim=40, scan_layers=False, qkv_bias=True, tie_embeddings=False)
TIED = dataclasses.replace(UNTIED, tie_embeddings=True, qkv_bias=False, qk_norm=True)
ALL_LINEAR = ("q", "k", "v", "o", "gate", "up", "down")
IDS = np.array([3, 17, 5, 60, 2, 9, 33, 41], np.int32)


def _all(cfg):
  return ALL_LINEAR + (("embed",) if cfg.tie_embeddings else ("embed", "lm_head"))


def _adapters(cfg, seed=1, zero_b=False):
  """Random A and B (B = 0 if asked) in the adapter tree of `cfg` (filled from numpy)."""
  ids = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda r: nn.unbox(Decoder(cfg).init(r, ids, ids, ids + 1)["lora"]),
                          jax.random.key(0))
  rng = np.random.default_rng(seed)
  def fill(path, s):
    if zero_b and jax.tree_util.keystr(path).endswith("['lora_b']"):
      return jnp.zeros(s.shape, s.dtype)
    return jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg, variables, rngs):
  n = len(IDS)
  return Decoder(cfg).apply(variables, IDS[None], jnp.arange(n)[None], jnp.ones((1, n), jnp.int32),
                            rngs=rngs)[0]


def _forward(cfg, variables, rngs=None):
  return np.asarray(_apply(cfg, variables, rngs or {}))


def _numpy_merged(params, adapters, scale):
  """W + scale * A @ B in float64 numpy, each adapter's A axes flattened against its B axes."""
  flat = traverse_util.flatten_dict(jax.tree.map(lambda x: np.asarray(x, np.float64), params))
  for path, ab in traverse_util.flatten_dict(adapters, is_leaf=lambda _, x: "lora_a" in x).items():
    a, b = np.asarray(ab["lora_a"], np.float64), np.asarray(ab["lora_b"], np.float64)
    key = path + (("embedding",) if path == ("embed",) else ("kernel",))
    w = flat[key]
    rank = a.shape[-1]
    flat[key] = w + scale * (a.reshape(-1, rank) @ b.reshape(rank, -1)).reshape(w.shape)
  return traverse_util.unflatten_dict(flat)


def _hand_count(cfg, rank, targets):
  """rank * (fan_in + fan_out) of every adapted matrix, written out per layer."""
  d, q, kv, m = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.mlp_dim
  per_layer = {"q": d + q, "k": d + kv, "v": d + kv, "o": q + d, "gate": d + m, "up": d + m,
               "down": m + d}
  n = sum(cfg.n_layers * per_layer[t] for t in targets if t in per_layer)
  n += (cfg.vocab_size + d) * (("embed" in targets) + ("lm_head" in targets))
  return rank * n


@pytest.mark.parametrize("cfg,targets,scan", [
    (UNTIED, ALL_LINEAR + ("embed", "lm_head"), True), (TIED, ("q", "v", "embed"), False)])
def test_trainable_count_is_rank_times_fan_in_plus_fan_out(cfg, targets, scan):
  cfg = dataclasses.replace(cfg, scan_layers=scan, n_layers=3)
  lcfg = lora.with_lora(cfg, lora.LoraConfig(rank=4, alpha=8.0, targets=targets))
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}),
                            jax.devices()[:1])
  adam = optax.adam(1e-3)
  abstract, _ = state_lib.state_shardings(lcfg, adam, mesh, base_config.SHARDING_RULES)
  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert size(abstract["params"]) == _hand_count(cfg, 4, targets) == lora.trainable_count(lcfg)
  # The optimizer holds two moments of the adapters and nothing of the base.
  assert size(abstract["opt_state"]) == 2 * size(abstract["params"]) + 1
  assert size(abstract["frozen"]) == size(random_params(cfg))


@pytest.mark.parametrize("cfg", [UNTIED, TIED], ids=["untied", "tied"])
def test_adapted_forward_matches_numpy_reference(cfg):
  lcfg = lora.with_lora(cfg, lora.LoraConfig(rank=3, alpha=6.0, dropout=0.5, targets=_all(cfg)))
  params, adapters = random_params(cfg, std=0.3), _adapters(lcfg)
  # The adapted model (no dropout rng: inference) is W + 2 * A @ B, computed in float64 numpy.
  want = reference_logits(_numpy_merged(params, adapters, 2.0), cfg, IDS)
  got = _forward(lcfg, {"params": params, "lora": adapters})
  assert np.abs(want - reference_logits(params, cfg, IDS)).max() > 0.1 * np.abs(want).max()
  assert_close(got, want, rel=1e-5)
  if cfg.tie_embeddings:  # lora.merge (float32, on device) gives the same model
    merged = jax.jit(lora.merge, static_argnums=2)(params, adapters, lcfg.lora)
    assert_close(_forward(cfg, {"params": merged}), want, rel=1e-5)


@pytest.mark.parametrize("cfg", [UNTIED, TIED], ids=["untied", "tied"])
def test_output_weight_delta_is_the_merged_head_minus_the_base(cfg):
  lcfg = lora.with_lora(cfg, lora.LoraConfig(rank=3, alpha=6.0, targets=_all(cfg)))
  params, adapters = random_params(cfg, std=0.3), _adapters(lcfg)
  merged = _numpy_merged(params, adapters, 2.0)
  path = ("embed", "embedding") if cfg.tie_embeddings else ("lm_head", "kernel")
  want = merged[path[0]][path[1]] - np.asarray(params[path[0]][path[1]], np.float64)
  assert_close(lora.output_weight_delta(lcfg, adapters), want, rel=1e-5)
  assert lora.output_weight_delta(cfg, adapters) is None


def test_zero_b_is_the_base_and_dropout_never_touches_it():
  lcfg = lora.with_lora(UNTIED, lora.LoraConfig(rank=3, alpha=6.0, dropout=0.5,
                                                targets=_all(UNTIED)))
  params = random_params(UNTIED, std=0.3)
  base = _forward(UNTIED, {"params": params})
  # Random A, B = 0: the adapted model is the base, with or without dropout (to float32
  # round-off: XLA compiles the programs' matmuls differently, so not bit for bit).
  rng = {"dropout": jax.random.key(3)}
  zero_b = {"params": params, "lora": _adapters(lcfg, zero_b=True)}
  assert_close(_forward(lcfg, zero_b), base, rel=1e-6)
  assert_close(_forward(lcfg, zero_b, rng), base, rel=1e-6)
  # Dropout (training only: a "dropout" rng) acts on the adapters' input.
  full = {"params": params, "lora": _adapters(lcfg)}
  assert np.abs(_forward(lcfg, full, rng) - _forward(lcfg, full)).max() > 1e-3
  # Without the "lora" collection the LoRA model is exactly the base (DPO's reference model).
  np.testing.assert_array_equal(_forward(lcfg, {"params": params}), base)


def test_initialisation_follows_peft():
  cfg = dataclasses.replace(UNTIED, dim=64, mlp_dim=256, vocab_size=512, n_layers=2,
                            scan_layers=True)
  lcfg = lora.with_lora(cfg, lora.LoraConfig(rank=8, alpha=16.0, targets=("q", "down", "embed")))
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}),
                            jax.devices()[:1])
  ad = jax.device_get(model_init.init(lcfg, jax.random.key(0), mesh, base_config.SHARDING_RULES, lora.COLLECTION))
  layers = ad["layers"]
  for node, fan_in in ((layers["attn"]["q_proj"], 64), (layers["mlp"]["down_proj"], 256)):
    bound = 1 / np.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for a in node["lora_a"]:  # each stacked layer its own draw, with that layer's fan-in
      assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
      np.testing.assert_allclose(np.std(a), bound / np.sqrt(3), rtol=0.15)
    assert not np.array_equal(node["lora_a"][0], node["lora_a"][1])
    assert not np.any(node["lora_b"])
  # The embedding the other way round, as PEFT: A = 0, B ~ N(0, 1).
  assert not np.any(ad["embed"]["lora_a"])
  np.testing.assert_allclose(np.std(ad["embed"]["lora_b"]), 1.0, rtol=0.25)
  # PEFT's init_lora_weights="gaussian": A ~ N(0, 1/rank).
  gauss = lora._initializer(lora.LoraConfig(rank=8, alpha=16.0, init="gaussian"), "q", "lora_a")
  np.testing.assert_allclose(np.std(gauss(jax.random.key(1), (256, 8), jnp.float32)), 1 / 8,
                             rtol=0.1)


def _config(**lora_fields):
  c = base_config.get_config()
  c.init_from = "runs/base"
  c.lora.update(lora_fields)
  return c


@pytest.mark.parametrize("fields,message", [
    ({"rank": -1}, r"config.lora.rank=-1: must be >= 0"),
    ({"rank": 8, "alpha": 0.0}, r"config.lora.alpha=0.0: must be > 0"),
    ({"rank": 8, "dropout": 1.0}, r"config.lora.dropout=1.0: must be in \[0, 1\)"),
    ({"rank": 8, "targets": "q,x"}, r"config.lora.targets='q,x'.*\['x'\] unknown"),
    ({"rank": 8, "targets": "q,q"}, r"config.lora.targets='q,q'.*non-repeating"),
    ({"rank": 8, "init": "xavier"}, r"config.lora.init='xavier'"),
])
def test_bad_lora_config_names_the_field(fields, message):
  with pytest.raises(ValueError, match=message):
    config_check.validate(_config(**fields))


def test_lora_needs_a_base_and_an_untied_head_for_lm_head():
  c = _config(rank=8)
  c.init_from = ""
  with pytest.raises(ValueError, match=r"config.init_from='': LoRA .* adapts a base model"):
    config_check.validate(c)
  config_check.validate(_config(rank=8, targets="q,k,v,o,gate,up,down,embed,lm_head"))
  with pytest.raises(ValueError, match=r"config.lora.targets includes 'lm_head' but the model ties"):
    lora.with_lora(TIED, lora.LoraConfig(rank=8, alpha=16.0, targets=("q", "lm_head")))
