"""LoRA: low-rank adapters on the decoder's projections, held in their own Flax collection.

A projection y = x @ W gains y += (alpha / rank) * (dropout(x) @ A) @ B, with A [in..., rank] and
B [rank, out...] (W's head axes kept, like W itself). The adapters are variables of the
collection "lora", beside (never inside) "params", at the path of the layer they adapt:

  Decoder(cfg).apply({"params": base}, ...)                    # exactly the base model
  Decoder(cfg).apply({"params": base, "lora": adapters}, ...)  # the adapted model
  Decoder(cfg).init(rng, ...)["lora"]                          # fresh adapters (B = 0)

where `cfg = with_lora(model_cfg, LoraConfig(...))`. So LoRA is a partition of the variables,
not a second model: a train state holds the adapters as its trainable "params" and the base in
"frozen" (train/lora_state.py), the optimizer sees only the adapters, and the reference model
of DPO, "the base without the adapter", is the same module applied to `{"params": frozen}`:

  policy_logits = model.apply(variables(cfg, params, frozen), ..., rngs=rngs(cfg, rng))
  reference_logits = model.apply({"params": frozen}, ...)      # no "lora": no adapter term

Initialisation follows PEFT (the reference our export is checked against): for a linear layer A is
kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)) ("kaiming"), or
N(0, 1/rank) ("gaussian"), and B = 0; for the embedding PEFT swaps the roles (A = 0, B ~ N(0, 1)),
and so do we. Either way the adapted model starts exactly at the base. Adapters are float32
whatever the base's dtype (PEFT's autocast_adapter_dtype): they are small, and bf16 would drown
their updates. Dropout (training only: it is applied when the caller passes a "dropout" rng) acts
on the adapter's input, never on the base path. The embedding lookup has none (as in PEFT); a
tied head's use of the embedding adapter has it, like PEFT's tied lm_head adapter.

Embedding and head: "embed" adapts the input table E [V, D] by A [V, r] @ B [r, D]; with tied
embeddings that same adapted table is the output projection too, so merging stays exact (PEFT's
`ensure_weight_tying`). "lm_head" needs an untied head.

Why written here rather than with qwix's LoRA provider: qwix intercepts the einsums of a model
and creates `kernel_lora_a/_lora_b` *inside* "params", so the base and the adapters are one tree
that must be split again by name; its dropout runs whenever rate > 0 (also at inference, wanting
a "dropout" rng there); its A initialiser is he_uniform, not PEFT's; it does not adapt embedding
lookups. The math is the few lines below, on the one `Projection` module every linear layer uses.
"""

import dataclasses
import math
import string
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

COLLECTION = "lora"
# config.lora.targets names -> the names of the modules they adapt in the decoder.
TARGET_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
                  "up": "up_proj", "down": "down_proj", "embed": "embed", "lm_head": "lm_head"}
TARGETS = tuple(TARGET_MODULES)
INITS = ("kaiming", "gaussian")
_TARGET_OF_MODULE = {m: t for t, m in TARGET_MODULES.items()}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Hashable (part of the jit-static ModelConfig)."""
  rank: int
  alpha: float
  dropout: float = 0.0
  targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
  init: str = "kaiming"

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def from_config(cls, c) -> "LoraConfig | None":
    """`config.lora` -> LoraConfig, or None when rank is 0 (LoRA off)."""
    if not c.rank:
      return None
    return cls(rank=int(c.rank), alpha=float(c.alpha), dropout=float(c.dropout),
               targets=parse_targets(c.targets), init=str(c.init))


def parse_targets(targets) -> tuple[str, ...]:
  """"q,k,v" (or a sequence) -> ("q", "k", "v"); refuses unknown names and duplicates."""
  names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
  names = [t for t in names if t]
  bad = [t for t in names if t not in TARGET_MODULES]
  if bad or not names or len(set(names)) != len(names):
    raise ValueError(f"config.lora.targets={','.join(names)!r}: must be a comma-separated, "
                     f"non-repeating list of {','.join(TARGETS)}" + (f" ({bad} unknown)" if bad else ""))
  return tuple(names)


def with_lora(model_cfg, lora_cfg: LoraConfig | None):
  """The ModelConfig whose decoder carries adapters (checked against the model's shape)."""
  if lora_cfg is None:
    return dataclasses.replace(model_cfg, lora=None)
  if model_cfg.tie_embeddings and "lm_head" in lora_cfg.targets:
    raise ValueError("config.lora.targets includes 'lm_head' but the model ties its output "
                     "projection to the embedding (config.model.tie_embeddings, taken from "
                     "init_from): use 'embed', which adapts the shared table for both")
  return dataclasses.replace(model_cfg, lora=lora_cfg)


def base_config(model_cfg):
  """The same model without adapters."""
  return dataclasses.replace(model_cfg, lora=None)


# ----------------------------------------------------------------------------------------------
# Inside the modules.

def _wanted(module, target: str) -> bool:
  """Whether `module` computes an adapter now: LoRA is configured for this target, and adapters
  are being created (init) or were passed in (apply with a "lora" collection)."""
  lora = module.cfg.lora
  if lora is None or target not in lora.targets:
    return False
  return module.is_initializing() or module.has_variable(COLLECTION, "lora_a")


def _initializer(lora: LoraConfig, target: str, name: str):
  """The initial distribution of adapter `name` ("lora_a" | "lora_b") of a target."""
  if target == "embed":  # PEFT: lora_embedding_A = 0, lora_embedding_B ~ N(0, 1)
    return nn.initializers.zeros if name == "lora_a" else nn.initializers.normal(1.0)
  return _linear_init(lora) if name == "lora_a" else nn.initializers.zeros


def _linear_init(lora: LoraConfig):
  def init(key, shape, dtype):
    fan_in = math.prod(shape[:-1])
    if lora.init == "gaussian":
      return jax.random.normal(key, shape, dtype) / lora.rank
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) as torch.nn.Linear and PEFT
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _variable(module, name, init, shape, axes):
  boxed = nn.with_logical_partitioning(init, tuple(axes))
  return module.variable(COLLECTION, name, lambda: boxed(module.make_rng("params"), shape,
                                                         jnp.float32)).value


def _dropout(module, x, rate: float):
  """Inverted dropout when the caller passed a "dropout" rng (training); identity otherwise."""
  if rate <= 0.0 or not module.has_rng("dropout"):
    return x
  keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def adapt_projection(module, x, y):
  """y + scale * (dropout(x) @ A) @ B for a `layers.Projection` whose target is configured.

  The projection's einsum (e.g. "bld,dnh->blnh") says which kernel axes x contracts (A's leading
  axes, with their logical names) and which are outputs (B's trailing axes).
  """
  target = _TARGET_OF_MODULE.get(module.name)
  if target is None or not _wanted(module, target):
    return y
  lora = module.cfg.lora
  lhs, rest = module.equation.split(",")
  kernel_subs, out_subs = rest.split("->")
  n_in = sum(c in lhs for c in kernel_subs)
  in_subs, out_only = kernel_subs[:n_in], kernel_subs[n_in:]
  assert set(in_subs) <= set(lhs) and not set(out_only) & set(lhs), module.equation
  shape, axes = tuple(module.shape), tuple(module.axes)
  a = _variable(module, "lora_a", _initializer(lora, target, "lora_a"),
                shape[:n_in] + (lora.rank,), axes[:n_in] + (None,))
  b = _variable(module, "lora_b", _initializer(lora, target, "lora_b"),
                (lora.rank,) + shape[n_in:], (None,) + axes[n_in:])
  r = next(c for c in "rstuvwxyz" + string.ascii_uppercase if c not in module.equation)
  batch_subs = "".join(c for c in lhs if c not in in_subs)
  dtype = module.cfg.compute_dtype
  x = _dropout(module, x.astype(dtype), lora.dropout)
  h = jnp.einsum(f"{lhs},{in_subs}{r}->{batch_subs}{r}", x, a.astype(dtype))
  delta = jnp.einsum(f"{batch_subs}{r},{r}{out_only}->{out_subs}", h, b.astype(dtype),
                     preferred_element_type=module.out_dtype)
  return y + (lora.scale * delta).astype(y.dtype)


def embed_adapter(module):
  """(A [V, r], B [r, D]) of the embedding table when "embed" is a target, else None. Call in
  the Embed module's setup()."""
  if not _wanted(module, "embed"):
    return None
  cfg = module.cfg
  a = _variable(module, "lora_a", _initializer(cfg.lora, "embed", "lora_a"),
                (cfg.vocab_size, cfg.lora.rank), ("vocab", None))
  b = _variable(module, "lora_b", _initializer(cfg.lora, "embed", "lora_b"),
                (cfg.lora.rank, cfg.dim), (None, "embed"))
  return a, b


def embed_lookup_delta(module, ab, ids_BxL):
  """scale * A[ids] @ B: the adapter's share of the looked-up embedding."""
  a_VxR, b_RxD = ab
  dtype = module.cfg.compute_dtype
  a_VxR = nn.with_logical_constraint(a_VxR, (None, None))  # gathered whole, as Embed's table
  h_BxLxR = jnp.take(a_VxR, ids_BxL, axis=0).astype(dtype)
  return module.cfg.lora.scale * jnp.einsum("blr,rd->bld", h_BxLxR, b_RxD.astype(dtype))


def embed_attend_delta(module, ab, x_BxLxD):
  """scale * x @ (A @ B)^T: the adapter's share of the tied output projection (float32)."""
  a_VxR, b_RxD = ab
  dtype = module.cfg.compute_dtype
  x_BxLxD = _dropout(module, x_BxLxD.astype(dtype), module.cfg.lora.dropout)
  h_BxLxR = jnp.einsum("bld,rd->blr", x_BxLxD, b_RxD.astype(dtype))
  return module.cfg.lora.scale * jnp.einsum("blr,vr->blv", h_BxLxR, a_VxR.astype(dtype),
                                            preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------
# Around the model: variables, initialisation, counts, merging.

def variables(model_cfg, params, frozen=None) -> dict:
  """The Flax variables of the model a train state trains: `{"params": params}`, or with LoRA
  `{"params": frozen (the base), "lora": params (the adapters)}`."""
  if model_cfg.lora is None:
    return {"params": params}
  return {"params": frozen, COLLECTION: params}


def rngs(model_cfg, rng) -> dict:
  """The `rngs=` of a training forward pass: a "dropout" key when the adapters use dropout."""
  if model_cfg.lora is not None and model_cfg.lora.dropout > 0:
    return {"dropout": rng}
  return {}


def trainable_count(model_cfg) -> int:
  """Adapter parameters of `model_cfg.lora`: rank * (in + out) per adapted matrix."""
  lora, c = model_cfg.lora, model_cfg
  if lora is None:
    return 0
  q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
  per_layer = {"q": c.dim + q, "k": c.dim + kv, "v": c.dim + kv, "o": q + c.dim,
               "gate": c.dim + c.mlp_dim, "up": c.dim + c.mlp_dim, "down": c.mlp_dim + c.dim}
  once = {"embed": c.vocab_size + c.dim, "lm_head": c.dim + c.vocab_size}
  total = sum(c.n_layers * per_layer[t] if t in per_layer else once[t] for t in lora.targets)
  return lora.rank * total


def _delta_equation(a_ndim: int, b_ndim: int, w_ndim: int) -> str:
  """einsum of A @ B into W's layout, with the stacked-layers axis when W has one."""
  lead = a_ndim + b_ndim - 2 - w_ndim
  n_in, n_out = a_ndim - 1 - lead, b_ndim - 1 - lead
  letters = iter("abcdefghijk")
  ins = "".join(next(letters) for _ in range(n_in))
  outs = "".join(next(letters) for _ in range(n_out))
  stack = "l" * lead  # the stacked-layers axis
  return f"{stack}{ins}r,{stack}r{outs}->{stack}{ins}{outs}"


def _base_leaf(flat_base: dict, module_path: tuple) -> tuple:
  for name in ("kernel", "embedding"):
    if module_path + (name,) in flat_base:
      return module_path + (name,)
  raise ValueError(f"adapter {'/'.join(module_path)} has no kernel or embedding in the base "
                   "parameters: the adapters and the base model do not match")


def merge(base: Any, adapters: Any, lora_cfg: LoraConfig, dtype=None) -> Any:
  """base + scale * A @ B on every adapted weight, computed in float32 and cast to `dtype`
  (default: each weight's own dtype). Pure: merging the same base again gives the same tree,
  never a double add. jit it with `out_shardings` to merge sharded."""
  flat = traverse_util.flatten_dict(base)
  out = dict(flat)
  flat_ad = traverse_util.flatten_dict(adapters)
  for module_path in sorted({k[:-1] for k in flat_ad}):
    a, b = flat_ad[module_path + ("lora_a",)], flat_ad[module_path + ("lora_b",)]
    key = _base_leaf(flat, module_path)
    w = flat[key]
    eq = _delta_equation(a.ndim, b.ndim, w.ndim)
    delta = jnp.einsum(eq, a.astype(jnp.float32), b.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    out[key] = (w.astype(jnp.float32) + lora_cfg.scale * delta).astype(dtype or w.dtype)
  if dtype is not None:
    out = {k: v.astype(dtype) for k, v in out.items()}
  return traverse_util.unflatten_dict(out)


def output_weight_delta(model_cfg, adapters):
  """scale * A @ B in the layout of the output projection's weight (the tied embedding [V, D],
  or the lm_head kernel [D, V]), float32; None when the head has no adapter. For losses computed
  from hidden states and that weight rather than from the logits: base weight + this delta is
  the adapted head (without the adapter's dropout, which acts on the head's input)."""
  if model_cfg.lora is None:
    return None
  node = adapters.get("embed" if model_cfg.tie_embeddings else "lm_head")
  if node is None:
    return None
  a, b = node["lora_a"].astype(jnp.float32), node["lora_b"].astype(jnp.float32)
  return model_cfg.lora.scale * jnp.einsum("ir,ro->io", a, b)
