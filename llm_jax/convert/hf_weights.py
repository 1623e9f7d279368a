"""The one table that maps llm_jax parameters to Hugging Face tensors, both ways.

Hugging Face stores every projection as a torch Linear weight [out, in]; llm_jax stores kernels
[in..., out...] with the head axes split out (q: [dim, heads, head_dim], o: [heads, head_dim,
dim]). So a kernel is `weight.T.reshape(ours)` on import and `kernel.reshape(in, out).T` on
export; biases are only reshaped and norms/embeddings copied. Nothing else differs: our RoPE uses
the same rotate-half layout, so q/k need no permutation.
"""

import dataclasses
import glob
import json
import math
import os
from typing import Iterator

import numpy as np

from llm_jax.model.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
# Buffers some old checkpoints saved next to the weights; recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Spec:
  path: tuple[str, ...]  # our parameter path inside the layer ("attn", "q_proj", "kernel") or model
  hf: str  # Hugging Face tensor name; "{i}" is the layer index, "{j}" the expert's
  shape: tuple[int, ...]  # our shape (one layer's, for per-layer tensors)
  n_in: int = 0  # kernels: how many leading axes of `shape` are the input; 0 = not a kernel
  experts: int = 0  # > 0: our [experts, ...] tensor is that many HF tensors, one per expert

  @property
  def one_shape(self) -> tuple[int, ...]:
    """Our shape of what one HF tensor holds (one expert's slice for expert weights)."""
    return self.shape[1:] if self.experts else self.shape

  def to_ours(self, w: np.ndarray) -> np.ndarray:
    if self.n_in:
      return w.T.reshape(self.one_shape)
    return w.reshape(self.one_shape)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.n_in:
      return np.ascontiguousarray(x.reshape(math.prod(self.one_shape[:self.n_in]), -1).T)
    return np.ascontiguousarray(x.reshape(-1) if x.ndim == 2 and self.path[-1] == "bias" else x)

  @property
  def hf_shape(self) -> tuple[int, ...]:
    shape = self.one_shape
    if self.n_in:
      return (math.prod(shape[self.n_in:]), math.prod(shape[:self.n_in]))
    return (math.prod(shape),) if self.path[-1] == "bias" else shape

  def hf_name(self, i: int = 0, j: int = 0) -> str:
    return self.hf.format(i=i, j=j)


def moe_specs(cfg: ModelConfig) -> list[Spec]:
  """A sparse layer's MLP in Qwen2-MoE / Qwen3-MoE form: router `mlp.gate`, per-expert Hub keys
  `mlp.experts.{j}.*_proj` (ours: stacked [E, ...] kernels), Qwen2-MoE's `mlp.shared_expert` and
  `mlp.shared_expert_gate`."""
  d, e, f, m = cfg.dim, cfg.moe.n_experts, cfg.expert_mlp_dim, cfg.moe
  pre = "model.layers.{i}.mlp."
  specs = [
      Spec(("moe", "router"), pre + "gate.weight", (d, e), 1),
      Spec(("moe", "gate_proj"), pre + "experts.{j}.gate_proj.weight", (e, d, f), 1, e),
      Spec(("moe", "up_proj"), pre + "experts.{j}.up_proj.weight", (e, d, f), 1, e),
      Spec(("moe", "down_proj"), pre + "experts.{j}.down_proj.weight", (e, f, d), 1, e),
  ]
  if m.n_shared_experts:
    fs = cfg.shared_mlp_dim
    specs += [Spec(("moe", "shared_expert", "gate_proj", "kernel"), pre + "shared_expert.gate_proj.weight", (d, fs), 1),
              Spec(("moe", "shared_expert", "up_proj", "kernel"), pre + "shared_expert.up_proj.weight", (d, fs), 1),
              Spec(("moe", "shared_expert", "down_proj", "kernel"), pre + "shared_expert.down_proj.weight", (fs, d), 1)]
  if m.shared_expert_gate:
    specs.append(Spec(("moe", "shared_expert_gate", "kernel"), pre + "shared_expert_gate.weight", (d, 1), 1))
  return specs


def layer_specs(cfg: ModelConfig, sparse: bool = False) -> list[Spec]:
  d, h, kv, hd, m = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
  pre = "model.layers.{i}."
  specs = [
      Spec(("attn_norm", "scale"), pre + "input_layernorm.weight", (d,)),
      Spec(("attn", "q_proj", "kernel"), pre + "self_attn.q_proj.weight", (d, h, hd), 1),
      Spec(("attn", "k_proj", "kernel"), pre + "self_attn.k_proj.weight", (d, kv, hd), 1),
      Spec(("attn", "v_proj", "kernel"), pre + "self_attn.v_proj.weight", (d, kv, hd), 1),
      Spec(("attn", "o_proj", "kernel"), pre + "self_attn.o_proj.weight", (h, hd, d), 2),
      Spec(("mlp_norm", "scale"), pre + "post_attention_layernorm.weight", (d,)),
  ]
  if sparse:
    specs += moe_specs(cfg)
  else:
    specs += [
        Spec(("mlp", "gate_proj", "kernel"), pre + "mlp.gate_proj.weight", (d, m), 1),
        Spec(("mlp", "up_proj", "kernel"), pre + "mlp.up_proj.weight", (d, m), 1),
        Spec(("mlp", "down_proj", "kernel"), pre + "mlp.down_proj.weight", (m, d), 1),
    ]
  if cfg.qkv_bias:
    specs += [
        Spec(("attn", "q_proj", "bias"), pre + "self_attn.q_proj.bias", (h, hd)),
        Spec(("attn", "k_proj", "bias"), pre + "self_attn.k_proj.bias", (kv, hd)),
        Spec(("attn", "v_proj", "bias"), pre + "self_attn.v_proj.bias", (kv, hd)),
    ]
  if cfg.qk_norm:
    specs += [
        Spec(("attn", "q_norm", "scale"), pre + "self_attn.q_norm.weight", (hd,)),
        Spec(("attn", "k_norm", "scale"), pre + "self_attn.k_norm.weight", (hd,)),
    ]
  return specs


def global_specs(cfg: ModelConfig) -> list[Spec]:
  specs = [
      Spec(("embed", "embedding"), "model.embed_tokens.weight", (cfg.vocab_size, cfg.dim)),
      Spec(("final_norm", "scale"), "model.norm.weight", (cfg.dim,)),
  ]
  if not cfg.tie_embeddings:
    specs.append(Spec(("lm_head", "kernel"), "lm_head.weight", (cfg.dim, cfg.vocab_size), 1))
  return specs


@dataclasses.dataclass(frozen=True)
class LayerGroup:
  """Layers whose parameters live together: under `prefix`, stacked on a leading axis in the order
  of `layers` when `stacked` (scanned), else one layer's tree. All of one kind (sparse or dense)."""
  prefix: tuple[str, ...]
  layers: tuple[int, ...]
  stacked: bool
  sparse: bool

  def specs(self, cfg: ModelConfig) -> list[Spec]:
    return layer_specs(cfg, self.sparse)


def layer_groups(cfg: ModelConfig) -> list[LayerGroup]:
  """Where each layer's parameters are (decoder.py): "layers" stacked (scan), "layers"/"layer_{j}"
  stacked over blocks (scan with every k-th layer sparse: layer j of each block), or "layers_{i}"."""
  n = cfg.n_layers
  if not cfg.scan_layers:
    return [LayerGroup((f"layers_{i}",), (i,), False, cfg.is_sparse_layer(i)) for i in range(n)]
  k = cfg.moe.every if cfg.moe.enabled else 1
  if k == 1:
    return [LayerGroup(("layers",), tuple(range(n)), True, cfg.moe.enabled)]
  return [LayerGroup(("layers", f"layer_{j}"), tuple(range(j, n, k)), True, j == k - 1)
          for j in range(k)]


def hf_names(cfg: ModelConfig) -> set[str]:
  """Every tensor name a Hugging Face checkpoint of this shape holds."""
  names = {s.hf for s in global_specs(cfg)}
  for g in layer_groups(cfg):
    for s in g.specs(cfg):
      names.update(s.hf_name(i, j) for i in g.layers for j in range(max(s.experts, 1)))
  return names


def get_path(tree: dict, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def layer_prefix(cfg: ModelConfig, i: int | None) -> tuple[str, ...]:
  """Where layer i's parameters live: "layers" (stacked on axis 0) or "layers_{i}"."""
  return ("layers",) if cfg.scan_layers else (f"layers_{i}",)


class SafetensorsDir:
  """Read access, one tensor at a time, to a directory of *.safetensors files (sharded with a
  model.safetensors.index.json, or not). Files are memory-mapped by safetensors, so only the
  tensor asked for is read into host memory."""

  def __init__(self, hf_dir: str):
    from safetensors import safe_open  # runtime dependency of import/export only

    index = os.path.join(hf_dir, INDEX_FILE)
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(hf_dir, "*.safetensors")))
      weight_map = None
    if not files:
      raise FileNotFoundError(f"{hf_dir}: no *.safetensors files (PyTorch .bin checkpoints are not "
                              "supported: re-save with save_pretrained(safe_serialization=True))")
    self._handles = {f: safe_open(os.path.join(hf_dir, f), framework="numpy") for f in files}
    self.where = {}
    for f, h in self._handles.items():
      for name in h.keys():
        self.where[name] = f
    if weight_map is not None:
      missing = {n: f for n, f in weight_map.items() if n not in self.where}
      if missing:
        raise ValueError(f"{index} lists tensors its files do not hold: {sorted(missing)[:5]}")
    self.hf_dir = hf_dir

  def names(self) -> set[str]:
    return {n for n in self.where if not n.endswith(_IGNORED_SUFFIXES)}

  def get(self, name: str) -> np.ndarray:
    return self._handles[self.where[name]].get_tensor(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handles[self.where[name]].get_slice(name).get_shape())


def hf_tensor_list(cfg: ModelConfig) -> list[tuple[str, Spec]]:
  """(hf_name, spec) of every tensor, in the order iter_hf_tensors yields them."""
  out = [(s.hf, s) for s in global_specs(cfg)]
  for g in layer_groups(cfg):
    for s in g.specs(cfg):
      out += [(s.hf_name(i, j), s) for i in g.layers for j in range(max(s.experts, 1))]
  return out


def iter_hf_tensors(cfg: ModelConfig, params: dict) -> Iterator[tuple[str, Spec, np.ndarray]]:
  """Yields (hf_name, spec, numpy tensor in HF layout) for every parameter, one at a time,
  copying each from the device only when it is yielded."""
  for s in global_specs(cfg):
    yield s.hf, s, s.to_hf(np.asarray(get_path(params, s.path)))
  for g in layer_groups(cfg):
    for s in g.specs(cfg):
      x_all = get_path(params, g.prefix + s.path)
      for n, i in enumerate(g.layers):
        x = x_all[n] if g.stacked else x_all
        for j in range(max(s.experts, 1)):
          yield s.hf_name(i, j), s, s.to_hf(np.asarray(x[j] if s.experts else x))
