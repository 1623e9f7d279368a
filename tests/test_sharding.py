"""Sharded init, forward and generation on 8 virtual CPU devices (in a subprocess: the device count is fixed at
JAX start-up), plus mesh-size validation."""

import os
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from llm_jax.sharding import mesh_shape

_SCRIPT = textwrap.dedent("""
  import dataclasses
  import flax.linen as nn
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import PartitionSpec as P
  import ml_collections
  from configs.base import SHARDING_RULES
  from llm_jax.model.config import ModelConfig
  from llm_jax.model.decoder import Decoder
  from llm_jax import sharding
  from llm_jax.model import init as model_init

  jax.config.update("jax_default_matmul_precision", "highest")
  assert jax.device_count() == 8
  mesh_cfg = ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=-1))
  mesh = sharding.make_mesh(mesh_cfg)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}, mesh.shape
  cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48,
                    qkv_bias=True, qk_norm=True, tie_embeddings=False, scan_layers=True)
  params = model_init.init(cfg, jax.random.key(0), mesh, SHARDING_RULES)

  # Each parameter sharded as SHARDING_RULES say (vocab/heads/mlp -> tensor, embed -> fsdp, layers -> none).
  want = {
      "embed/embedding": P("tensor", "fsdp"),
      "lm_head/kernel": P("fsdp", "tensor"),
      "final_norm/scale": P(None),
      "layers/attn/q_proj/kernel": P(None, "fsdp", "tensor", None),
      "layers/attn/q_proj/bias": P(None, "tensor", None),
      "layers/attn/k_proj/kernel": P(None, "fsdp", "tensor", None),
      "layers/attn/o_proj/kernel": P(None, "tensor", None, "fsdp"),
      "layers/attn/q_norm/scale": P(None, None),
      "layers/mlp/gate_proj/kernel": P(None, "fsdp", "tensor"),
      "layers/mlp/down_proj/kernel": P(None, "tensor", "fsdp"),
  }
  flat = {jax.tree_util.keystr(k, simple=True, separator="/"): v
          for k, v in jax.tree_util.tree_leaves_with_path(params)}
  norm = lambda spec: tuple(spec) + (None,) * 8
  for name, spec in want.items():
    got = flat[name].sharding
    assert got.mesh.shape == mesh.shape, name
    assert norm(got.spec)[:flat[name].ndim] == norm(spec)[:flat[name].ndim], (name, got.spec, spec)
  # Really split: the embedding's shard is 1/4 of it (vocab over tensor=2, embed over fsdp=2).
  shard = flat["embed/embedding"].addressable_shards[0].data
  assert shard.shape == (32, 16), shard.shape

  # HF Llama-style init: normal(init_std) kernels/embeddings, zero biases, unit norm scales.
  assert abs(float(jnp.std(flat["layers/mlp/up_proj/kernel"])) - cfg.init_std) < 0.002
  assert abs(float(jnp.std(flat["embed/embedding"])) - cfg.init_std) < 0.004
  assert float(jnp.abs(flat["layers/attn/q_proj/bias"]).max()) == 0.0
  assert float(jnp.abs(flat["layers/attn/k_norm/scale"] - 1).max()) == 0.0

  rng = np.random.default_rng(0)
  ids = rng.integers(0, 64, (4, 16)).astype(np.int32)
  pos = np.tile(np.arange(16), (4, 1)).astype(np.int32)
  seg = np.ones((4, 16), np.int32); seg[:, 10:] = 2; pos[:, 10:] -= 10; seg[1, 13:] = 0
  fwd = lambda p, i, q, s: Decoder(cfg).apply({"params": p}, i, q, s)
  with jax.set_mesh(mesh), nn.logical_axis_rules(SHARDING_RULES):
    batch_s = sharding.batch_sharding(mesh, SHARDING_RULES)
    args = [jax.device_put(a, batch_s) for a in (ids, pos, seg)]
    sharded = jax.jit(fwd)(params, *args)
  assert sharded.sharding.spec[0] == ("data", "fsdp"), sharded.sharding
  single_params = jax.device_put(params, jax.devices()[0])
  single = jax.jit(fwd)(single_params, ids, pos, seg)
  err = float(np.abs(np.asarray(sharded) - np.asarray(single)).max())
  assert err <= 1e-5, err

  # Generation on the sharded model: the KV cache is split over the batch (cache_batch rule), and
  # a batch of 3 (padded to the 4 batch shards) gives the single-device tokens.
  from llm_jax.infer.generate import Generator, _prefill
  from llm_jax.infer.sampling import SamplingConfig
  with jax.set_mesh(mesh), nn.logical_axis_rules(SHARDING_RULES):
    state, _ = _prefill({"params": params}, np.ones((4, 16), np.int32), np.full((4,), 5, np.int32), cfg=cfg,
                        cache_len=32)
  assert norm(state["cache"]["k"].sharding.spec)[:3] == (None, ("data", "fsdp"), None), state["cache"]["k"].sharding
  prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
  greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
  got = Generator(params, cfg, mesh=mesh, rules=SHARDING_RULES).generate(prompts, greedy)
  want = Generator(single_params, cfg).generate(prompts, greedy)
  assert [g.tokens for g in got] == [g.tokens for g in want], (got, want)
  print("OK", err)
""")


def test_sharded_init_forward_and_generation_match_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr[-4000:]


@pytest.mark.parametrize("sizes,n,want", [((-1, 1, 1), 8, (8, 1, 1, 1)), ((2, 2, -1), 8, (2, 2, 1, 2)),
                                          ((1, 4, 2), 8, (1, 4, 1, 2))])
def test_mesh_shape(sizes, n, want):
  # Configs that do not name the expert axis (written before it existed) get expert=1.
  cfg = ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"), sizes)))
  assert mesh_shape(cfg, n) == want
  cfg = ml_collections.ConfigDict(dict(zip(("data", "fsdp", "expert", "tensor"), (2, 1, -1, 2))))
  assert mesh_shape(cfg, n) == (2, 1, n // 4, 2)


@pytest.mark.parametrize("sizes,field", [((-1, 3, 1), "mesh.fsdp"), ((2, 2, 1), "mesh"), ((-1, -1, 1), "mesh")])
def test_mesh_shape_errors_name_the_field(sizes, field):
  cfg = ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"), sizes)))
  with pytest.raises(ValueError, match=f"config.{field}"):
    mesh_shape(cfg, 8)


def test_distributed_env_must_be_complete(monkeypatch):
  from llm_jax import sharding
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
            "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(k, raising=False)
  sharding.maybe_initialize_distributed()  # single process: nothing to start
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
    sharding.maybe_initialize_distributed()
