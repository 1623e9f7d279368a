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
  hf: str  # Hugging Face tensor name; "{i}" is the layer index
  shape: tuple[int, ...]  # our shape (one layer's, for per-layer tensors)
  n_in: int = 0  # kernels: how many leading axes of `shape` are the input; 0 = not a kernel

  def to_ours(self, w: np.ndarray) -> np.ndarray:
    if self.n_in:
      return w.T.reshape(self.shape)
    return w.reshape(self.shape)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.n_in:
      return np.ascontiguousarray(x.reshape(math.prod(self.shape[:self.n_in]), -1).T)
    return np.ascontiguousarray(x.reshape(-1) if x.ndim == 2 and self.path[-1] == "bias" else x)

  @property
  def hf_shape(self) -> tuple[int, ...]:
    if self.n_in:
      return (math.prod(self.shape[self.n_in:]), math.prod(self.shape[:self.n_in]))
    return (math.prod(self.shape),) if self.path[-1] == "bias" else self.shape


def layer_specs(cfg: ModelConfig) -> list[Spec]:
  d, h, kv, hd, m = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
  pre = "model.layers.{i}."
  specs = [
      Spec(("attn_norm", "scale"), pre + "input_layernorm.weight", (d,)),
      Spec(("attn", "q_proj", "kernel"), pre + "self_attn.q_proj.weight", (d, h, hd), 1),
      Spec(("attn", "k_proj", "kernel"), pre + "self_attn.k_proj.weight", (d, kv, hd), 1),
      Spec(("attn", "v_proj", "kernel"), pre + "self_attn.v_proj.weight", (d, kv, hd), 1),
      Spec(("attn", "o_proj", "kernel"), pre + "self_attn.o_proj.weight", (h, hd, d), 2),
      Spec(("mlp_norm", "scale"), pre + "post_attention_layernorm.weight", (d,)),
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


def hf_names(cfg: ModelConfig) -> set[str]:
  """Every tensor name a Hugging Face checkpoint of this shape holds."""
  names = {s.hf for s in global_specs(cfg)}
  for s in layer_specs(cfg):
    names.update(s.hf.format(i=i) for i in range(cfg.n_layers))
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


def iter_hf_tensors(cfg: ModelConfig, params: dict) -> Iterator[tuple[str, Spec, np.ndarray]]:
  """Yields (hf_name, spec, numpy tensor in HF layout) for every parameter, one at a time,
  copying each from the device only when it is yielded."""
  for s in global_specs(cfg):
    yield s.hf, s, s.to_hf(np.asarray(get_path(params, s.path)))
  for s in layer_specs(cfg):
    for i in range(cfg.n_layers):
      x = get_path(params, layer_prefix(cfg, i) + s.path)
      x = x[i] if cfg.scan_layers else x
      yield s.hf.format(i=i), s, s.to_hf(np.asarray(x))
