"""The CPU fast paths compute what the plain formulations compute (llm_jax/model/cpu.py, the
one-token decoding attention), against independent references: numpy einsum in float64, the
float64 numpy decoder, a forward pass without any cache."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.model import cpu
from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder, init_cache, unstack_layers
from tests.model_reference import random_params, reference_logits
from tests.numerics import assert_close

jax.config.update("jax_default_matmul_precision", "highest")

CFG = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=40,
                  qkv_bias=True, init_std=0.3, scan_layers=False, tie_embeddings=False)


@pytest.mark.parametrize("equation,x_shape,k_shape", [
    ("bld,dnh->blnh", (2, 3, 4), (4, 5, 6)),  # q/k/v projections
    ("blnh,nhd->bld", (2, 3, 5, 6), (5, 6, 4)),  # o_proj: two contracted axes
    ("bld,vd->blv", (2, 3, 4), (7, 4)),  # tied logits: kernel contracted last
    ("blf,fd->bld", (2, 3, 8), (8, 4)),
    ("bkgls,bskh->blkgh", (2, 3, 1, 4, 5), (2, 5, 3, 6)),  # not a projection: plain einsum
])
def test_flat_einsum_equals_einsum(equation, x_shape, k_shape):
  rng = np.random.default_rng(0)
  x, k = rng.standard_normal(x_shape), rng.standard_normal(k_shape)
  got = cpu.flat_einsum(equation, jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32))
  assert_close(np.asarray(got), np.einsum(equation, x, k), rel=1e-5)


@pytest.fixture
def small_blocks(monkeypatch):
  """Query blocks of 4 from 8 tokens on, so a short test sequence takes the blocked path."""
  monkeypatch.setattr(cpu, "QUERY_BLOCK", 4)
  monkeypatch.setattr(cpu, "MIN_BLOCKED_LENGTH", 8)
  assert len(cpu.query_blocks(18, 18)) == 5


def _stacked(params):
  """The same weights in the scan layout ("layers" stacked on axis 0)."""
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), params["layers_0"], params["layers_1"])
  return out


def test_blocked_attention_packed_matches_numpy_reference(small_blocks):
  """Documents that straddle query blocks (lengths 5, 7, 3 with blocks of 4) each get the float64
  reference's logits, and the padding stays finite (scan layout, unrolled on the CPU)."""
  del small_blocks
  rng = np.random.default_rng(0)
  lengths, pad = [5, 7, 3], 3
  docs = [rng.integers(0, CFG.vocab_size, n).astype(np.int32) for n in lengths]
  ids = np.concatenate(docs + [np.zeros(pad, np.int32)])[None]
  pos = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(pad, int)])[None].astype(np.int32)
  seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(pad, int)])[None]
  params = random_params(CFG, seed=1)
  cfg = dataclasses.replace(CFG, scan_layers=True)
  logits = np.asarray(jax.jit(Decoder(cfg).apply)({"params": _stacked(params)}, ids, pos,
                                                   seg.astype(np.int32)))[0]
  assert np.isfinite(logits).all()
  start = 0
  for doc in docs:
    assert_close(logits[start:start + len(doc)], reference_logits(params, CFG, doc), rel=1e-5)
    start += len(doc)


def test_blocked_attention_gradients_equal_one_block(small_blocks, monkeypatch):
  """The backward pass through the query blocks equals the one-block formulation's (packed
  segments and padding in the mask, grouped heads)."""
  del small_blocks
  from llm_jax.model import attention  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  q, k, v, w = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                for s in ((2, 18, 4, 8), (2, 18, 2, 8), (2, 18, 2, 8), (2, 18, 4, 8)))
  seg = np.array([[1] * 6 + [2] * 9 + [0] * 3, [1] * 18], np.int32)
  mask = attention.segment_causal_mask(jnp.asarray(seg))

  def grads():
    loss = lambda *qkv: jnp.sum(w * attention.xla_attention(*qkv, mask, jnp.float32, causal=True))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  blocked = grads()
  monkeypatch.setattr(cpu, "MIN_BLOCKED_LENGTH", 10 ** 9)  # one block
  whole = grads()
  for a, b in zip(blocked, whole):
    assert_close(a, b, rel=1e-5)


@pytest.mark.parametrize("n_heads,n_kv,head_dim,length", [
    (4, 2, 8, 18),  # grouped heads, blocks of 4 with a short last block
    (4, 4, 16, 20),  # one query head per kv head
    (8, 1, 8, 12),  # multi-query
    (2, 1, 8, 6),  # shorter than MIN_BLOCKED_LENGTH: one block
])
def test_cpu_attention_equals_xla_attention_with_gradients(small_blocks, n_heads, n_kv, head_dim, length):
  """cpu_attention (flash-style forward and backward, head-major, query blocks) computes what the
  plain softmax over the segment-causal mask computes, outputs and q/k/v gradients, for packed
  documents that straddle blocks and a padded tail."""
  del small_blocks
  from llm_jax.model import attention, cpu_attention  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  q, k, v, w = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (
      (2, length, n_heads, head_dim), (2, length, n_kv, head_dim), (2, length, n_kv, head_dim),
      (2, length, n_heads, head_dim)))
  seg = np.ones((2, length), np.int32)
  seg[0, length // 3:] = 2
  seg[0, length - 3:] = 0  # padding: its own segment
  seg = jnp.asarray(seg)

  def plain(*qkv):
    return attention.xla_attention(*qkv, attention.segment_causal_mask(seg), jnp.float32)

  def fast(*qkv):
    return cpu_attention.causal_attention(*qkv, seg, jnp.float32)

  for f in (plain, fast):
    assert np.isfinite(np.asarray(jax.jit(f)(q, k, v))).all()
  assert_close(jax.jit(fast)(q, k, v), jax.jit(plain)(q, k, v), rel=1e-5)
  grads = [jax.jit(jax.grad(lambda *qkv, f=f: jnp.sum(w * f(*qkv)), argnums=(0, 1, 2)))(q, k, v)
           for f in (fast, plain)]
  for got, want in zip(*grads):
    assert_close(got, want, rel=1e-5)


def test_cpu_attention_bfloat16_tracks_float32(small_blocks):
  """With bfloat16 matmul inputs (softmax still float32) the output and gradients stay within
  bfloat16 round-off of the float32 computation."""
  del small_blocks
  from llm_jax.model import cpu_attention  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  q, k, v, w = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                for s in ((2, 18, 4, 8), (2, 18, 2, 8), (2, 18, 2, 8), (2, 18, 4, 8)))
  seg = jnp.asarray(np.repeat([[1, 2, 3]], 6, axis=1).repeat(2, axis=0), jnp.int32)
  run = {dt: jax.jit(jax.value_and_grad(
      lambda q, k, v, dt=dt: jnp.sum(w * cpu_attention.causal_attention(q, k, v, seg, dt).astype(jnp.float32)),
      argnums=(0, 1, 2))) for dt in (jnp.float32, jnp.bfloat16)}
  (loss32, g32), (loss16, g16) = run[jnp.float32](q, k, v), run[jnp.bfloat16](q, k, v)
  assert abs(float(loss16) - float(loss32)) <= 3e-2 * float(jnp.sum(jnp.abs(w)))
  for got, want in zip(g16, g32):
    assert got.dtype == jnp.float32
    assert_close(got, want, rel=5e-2)


def _as_stacked(cache_array):
  """A cache array in the stacked [n_layers, B, S, K, H] layout: per-layer caches are lists of
  head-major [B, K, S, H] arrays."""
  if isinstance(cache_array, (list, tuple)):
    return np.swapaxes(np.stack([np.asarray(c) for c in cache_array]), 2, 3)
  return np.asarray(cache_array)


@pytest.mark.parametrize("layout", ["stacked", "per_layer"])
def test_one_token_decode_step_equals_forward_without_cache(layout):
  """Prefill two rows of different lengths (one right-padded), then decode one token per row:
  "stacked", the scan layout's [n_layers, ...] cache (callers of Decoder other than Generator);
  "per_layer", unrolled layers each with its own cache buffer, written before it is read (what
  Generator runs on the CPU). Its logits are those of a plain forward over prompt + token, and
  its key/value land in the cache at its position only."""
  params = random_params(CFG, seed=4)
  if layout == "stacked":
    run_cfg, run_params = dataclasses.replace(CFG, scan_layers=True), _stacked(params)
    assert jax.tree.all(jax.tree.map(np.array_equal, unstack_layers(run_params, run_cfg)[0], params))
  else:
    run_cfg, run_params = CFG, params
  prompts = [[5, 17, 3, 40, 8], [9, 1, 44]]
  lengths = np.array([len(p) for p in prompts], np.int32)
  ids = np.zeros((2, 8), np.int32)
  for i, p in enumerate(prompts):
    ids[i, :len(p)] = p
  pos = np.tile(np.arange(8, dtype=np.int32), (2, 1))
  seg = (pos < lengths[:, None]).astype(np.int32)
  model = Decoder(run_cfg)
  _, cache = jax.jit(model.apply)({"params": run_params}, ids, pos, seg,
                                  cache=init_cache(run_cfg, 2, 16, per_layer=layout == "per_layer"))
  nxt = np.array([[11], [23]], np.int32)
  step_logits, new_cache = jax.jit(model.apply)({"params": run_params}, nxt, lengths[:, None],
                                                np.ones((2, 1), np.int32), cache=cache)
  for i, p in enumerate(prompts):  # reference: no cache, prompt and token as one sequence
    full = np.array([p + [int(nxt[i, 0])]], np.int32)
    want = jax.jit(Decoder(CFG).apply)({"params": params}, full, np.arange(full.shape[1])[None],
                                       np.ones_like(full))[0, -1]
    assert_close(np.asarray(step_logits[i, 0]), np.asarray(want), rel=1e-5)
  for name in ("k", "v"):
    before, after = _as_stacked(cache[name]), _as_stacked(new_cache[name])
    assert before.shape == after.shape == (CFG.n_layers, 2, 16, CFG.n_kv_heads, CFG.head_dim)
    for i, n in enumerate(lengths):
      changed = np.any(before[:, i] != after[:, i], axis=(0, 2, 3))
      assert changed.nonzero()[0].tolist() == [n]


def test_compare_torch_builds_the_same_model():
  """`bench --compare_torch` times a transformers model of exactly the benchmarked shape: the same
  parameter count, and (with our weights loaded) the same logits."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  import torch  # pylint: disable=g-import-not-at-top
  from llm_jax.train import bench, bench_torch, measure  # pylint: disable=g-import-not-at-top
  from llm_jax.model import flops  # pylint: disable=g-import-not-at-top
  config = bench.shape_config("nanogpt-cpu")
  cfg = ModelConfig.from_config(config.model)
  assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.vocab_size, config.data.seq_len,
          config.data.batch_size) == (128, 4, 4, 65, 64, 12)
  batch = measure.synthetic_batch(2, 16, cfg.vocab_size, docs_per_row=1)
  step = bench_torch.TorchTrainStep(cfg, config.train, batch)
  params = jax.eval_shape(lambda: random_params(dataclasses.replace(cfg, scan_layers=False)))
  assert sum(p.numel() for p in step.model.parameters()) == flops.param_counts(params)["total"]
  losses = [step.step() for _ in range(3)]
  assert np.isfinite(losses).all() and losses[-1] < losses[0]  # it trains the same batch
  assert step.threads() == torch.get_num_threads()


@pytest.mark.parametrize("layout", ["scanned", "stacked", "per_layer"])
def test_fresh_cache_prefill_equals_attending_over_the_cache(layout):
  """Generation's prefill (Decoder(fresh_cache=True): causal attention over the prompt alone, then
  the keys/values written) gives the logits and the cache of the generic prefill that attends over
  the whole fixed-size cache, for right-padded prompts of different lengths: scanned layers,
  unrolled layers with a stacked cache, and unrolled layers with one cache buffer each."""
  params = random_params(CFG, seed=6)
  cfg, per_layer = CFG, layout == "per_layer"
  if layout == "scanned":
    cfg, params = dataclasses.replace(CFG, scan_layers=True), _stacked(params)
  lengths = np.array([7, 3], np.int32)
  ids = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 8)).astype(np.int32)
  pos = np.tile(np.arange(8, dtype=np.int32), (2, 1))
  seg = (pos < lengths[:, None]).astype(np.int32)
  runs = []
  for fresh in (True, False):
    cache = init_cache(cfg, 2, 16, per_layer=per_layer)
    logits, cache = jax.jit(Decoder(cfg, fresh_cache=fresh).apply)(
        {"params": params}, ids, pos, seg, cache=cache, logits_at_BxK=(lengths - 1)[:, None])
    runs.append((np.asarray(logits), {k: _as_stacked(v) for k, v in cache.items()}))
  (fresh_logits, fresh_cache), (plain_logits, plain_cache) = runs
  assert_close(fresh_logits, plain_logits, rel=1e-5)
  for name in ("k", "v"):
    assert_close(fresh_cache[name], plain_cache[name], rel=1e-5)
    assert not fresh_cache[name][:, 1, 3:].any()  # padding and later slots stay empty


def test_bench_matmul_runs_every_side():
  """`python -m llm_jax.model.bench_matmul` (docs/benchmarks.md) times each shape in JAX and in
  torch with 1 and with all threads; tiny shapes here, only that every side runs and yields a
  rate."""
  pytest.importorskip("torch")
  from llm_jax.model import bench_matmul  # pylint: disable=g-import-not-at-top
  shapes = bench_matmul._shapes(dim=32, mlp=48, tokens=16)
  assert [s[1:] for s in shapes] == [(1, 1, 32, 48), (1, 8, 32, 48), (1, 16, 32, 48), (16, 256, 64, 288)]
  for rate in (bench_matmul._jax_rate(2, 4, 8, 16), bench_matmul._torch_rate(2, 4, 8, 16, 1)):
    assert np.isfinite(rate) and rate > 0


def test_cpu_peak_is_measured_once_per_machine_and_kept(tmp_path, monkeypatch):
  """MFU's CPU peak is measured on a machine's first run and read back afterwards
  (docs/benchmarks.md: it takes about 0.7 s), with the load average it was measured at; an
  unreadable file is measured over and rewritten whole."""
  from llm_jax import devices  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  monkeypatch.setattr(devices, "load_average", lambda: 0.5)
  path = devices.cpu_peak_cache_path()
  assert path == str(tmp_path / "llm_jax" / "cpu_peak.json")
  measure = devices._measured_cpu_peak_record.__wrapped__  # without the per-process lru_cache
  peak = measure("float32", n=256, repeats=2)["flops"]
  assert np.isfinite(peak) and peak > 0
  with open(path) as f:
    kept = json.load(f)
  (key,) = [k for k in kept if k.endswith("float32 | 256")]
  assert kept[key]["flops"] == peak and kept[key]["load"] == 0.5
  kept[key]["flops"] = 123.0  # a later run at no lower load reads the kept figure, not measuring
  with open(path, "w") as f:
    json.dump(kept, f)
  assert measure("float32", n=256, repeats=2)["flops"] == 123.0
  with open(path, "w") as f:
    f.write("{not json")
  again = measure("float32", n=256, repeats=2)
  assert again["flops"] > 0 and again["flops"] != 123.0
  with open(path) as f:
    assert json.load(f) == {key: again}


def test_cpu_peak_keeps_the_highest_seen_and_says_its_load(tmp_path, monkeypatch):
  """A peak measured on a busy machine (issue 24: 0.257 TFLOP/s kept for every later MFU) is
  measured again once the machine is quieter than at every earlier measurement, and the higher
  figure replaces it; a lower one never does. The load average of the kept figure is in the
  cache and in the line MFU's log gives. The matmul is replaced by given figures: what is tested
  is the bookkeeping, not the timing."""
  from llm_jax import devices  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  figures = iter([0.257e12, 0.290e12, 0.200e12])
  calls = []
  monkeypatch.setattr(devices, "_matmul_peak", lambda *a: calls.append(a) or next(figures))
  measure = devices._measured_cpu_peak_record.__wrapped__
  load = {"now": 7.9}
  monkeypatch.setattr(devices, "load_average", lambda: load["now"])
  assert measure("float32")["flops"] == 0.257e12  # measured busy
  assert measure("float32")["flops"] == 0.257e12 and len(calls) == 1  # as busy: kept, not measured
  load["now"] = 0.6
  rec = measure("float32")  # quieter than ever before: measured again, the better one kept
  assert len(calls) == 2 and rec["flops"] == 0.290e12 and rec["load"] == 0.6
  assert measure("float32")["flops"] == 0.290e12 and len(calls) == 2  # no quieter: kept
  load["now"] = 0.05
  rec = measure("float32")  # quieter again, but a worse figure: the higher one stays
  assert len(calls) == 3 and rec["flops"] == 0.290e12 and rec["load"] == 0.6
  assert rec["tried_load"] == 0.05
  with open(devices.cpu_peak_cache_path()) as f:
    (kept,) = json.load(f).values()
  assert kept["flops"] == 0.290e12 and kept["load"] == 0.6
  # a cache from before loads were kept (a bare number) is a peak of unknown load: measured once
  with open(devices.cpu_peak_cache_path()) as f:
    keys = list(json.load(f))
  with open(devices.cpu_peak_cache_path(), "w") as f:
    json.dump({k: 0.3e12 for k in keys}, f)
  figures = iter([0.1e12])
  assert measure("float32")["flops"] == 0.3e12 and len(calls) == 4
  devices._measured_cpu_peak_record.cache_clear()
  monkeypatch.setattr(devices, "_measured_cpu_peak_record", lambda *a, **k: dict(kept))
  if jax.devices()[0].platform == "cpu":
    _, source = devices.peak_flops("float32")
    assert "at load average 0.6" in source and "highest seen" in source


def test_busy_machine_is_said_beside_speed_figures(monkeypatch):
  """Load above the core count: one line saying speed figures are not representative; none on a
  quiet machine."""
  from llm_jax import devices  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(devices, "_cpu_count", lambda: 2)
  monkeypatch.setattr(devices, "load_average", lambda: 7.5)
  note = devices.busy_note()
  assert "busy" in note and "7.5 on 2 cores" in note and "not representative" in note
  monkeypatch.setattr(devices, "load_average", lambda: 1.9)
  assert devices.busy_note() is None
