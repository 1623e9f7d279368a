"""Import a local Hugging Face Llama / Qwen2 / Qwen3 / Qwen2-MoE / Qwen3-MoE directory as an
llm_jax run directory.

  python -m llm_jax.convert.hf_import --hf_dir=/models/Qwen2.5-0.5B --workdir=runs/qwen
  python -m llm_jax.main --config=configs/sft.py --workdir=runs/sft \
      --config.init_from=runs/qwen            # any job starts from it

Writes workdir/config.json (the full llm_jax config, model fields from the HF config.json),
a params-only checkpoint (llm_jax.train.rundir.save_params), the tokenizer files under
workdir/tokenizer/ (config.data.tokenizer.path points there) and workdir/hf_config.json (the
source config, which export reads back for max_position_embeddings). The import holds the
workdir's lock (workdir_lock.py) while it writes: a second writer of it is refused.

Host memory: tensors are read one at a time from memory-mapped safetensors files and put on
their devices before the next is read. A per-layer tensor of a scanned model is written into
one preallocated [n_layers, ...] host buffer, layer by layer, which is freed once on device. So
the peak host memory above the device copy of the model is one stacked tensor (the largest is
the MLP or the embedding: 0.5 GB for a 1B model in bf16) plus one layer's tensor, not a second
copy of the model. On CPU the "device" is host memory too, so the total is about 1x the model.
MoE experts (one HF tensor per expert) fill an [n_layers, n_experts, ...] buffer the same way:
the largest stacked tensor is then one of the three expert projections.
"""

import json
import os
import shutil
from typing import Any

from absl import flags, logging
import jax
import ml_collections
import numpy as np

from llm_jax import console, rundir, workdir_lock
from llm_jax.convert import hf_config, hf_weights
from llm_jax.model import init as model_init
from llm_jax.model.config import ModelConfig

# Files a Hugging Face tokenizer may consist of; whichever exist are copied.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt")
SOURCE_CONFIG = rundir.HF_SOURCE_CONFIG
_NP_DTYPES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16, "float16": np.float16}


def read_hf_config(hf_dir: str) -> dict[str, Any]:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: --hf_dir must be a local Hugging Face model "
                            "directory (config.json + *.safetensors); nothing is downloaded")
  with open(path) as f:
    return json.load(f)


def run_config(hf: dict[str, Any], source: str, dtype: str, scan_layers: bool | None,
               base_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The full llm_jax config of the imported run: a copy of `base_config` (the job defaults,
  configs/base.py's from the command line) with the HF model's shape."""
  config = ml_collections.ConfigDict(base_config.to_dict())
  config.model.update(hf_config.model_fields_from_hf(hf, source))
  config.model.param_dtype = dtype
  config.model.dtype = dtype
  if scan_layers is not None:
    config.model.scan_layers = scan_layers
  return config


def _check_tensors(ckpt: hf_weights.SafetensorsDir, cfg: ModelConfig):
  """Every tensor the model needs is there with the right shape, and nothing else is: an
  unexpected tensor (say o_proj.bias) means a feature the config did not declare."""
  expected = hf_weights.hf_names(cfg)
  have = ckpt.names()
  if cfg.tie_embeddings:
    have.discard("lm_head.weight")  # some tied checkpoints store the copy anyway
  missing, extra = sorted(expected - have), sorted(have - expected)
  if missing or extra:
    raise ValueError(f"{ckpt.hf_dir}: tensors do not match config.json: missing {missing[:6]}, "
                     f"unexpected {extra[:6]} (unsupported features or a mismatched config)")
  specs = [(s, 0) for s in hf_weights.global_specs(cfg)]
  for g in hf_weights.layer_groups(cfg):  # the first layer of each kind (dense, sparse)
    specs += [(s, g.layers[0]) for s in g.specs(cfg)]
  for s, i in specs:
    name = s.hf_name(i)
    if ckpt.shape(name) != s.hf_shape:
      raise ValueError(f"{ckpt.hf_dir}: tensor {name} has shape {ckpt.shape(name)}, config.json "
                       f"implies {s.hf_shape}")


def _put(x: np.ndarray, sharding) -> jax.Array:
  # make_array_from_callback copies only this process's shards, so it also works multi-host.
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def load_hf_params(hf_dir: str, cfg: ModelConfig, shardings: Any = None) -> dict:
  """The params tree of `cfg` filled from the safetensors files of `hf_dir`, tensor by tensor.

  `shardings`: a tree of shardings matching the params (e.g. from
  llm_jax.sharding.abstract_params_and_shardings); None puts everything on one device.
  """
  ckpt = hf_weights.SafetensorsDir(hf_dir)
  _check_tensors(ckpt, cfg)
  dtype = _NP_DTYPES[cfg.param_dtype]
  single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  sharding_of = (lambda path: single) if shardings is None else (
      lambda path: hf_weights.get_path(shardings, path))
  params: dict = {}
  for s in hf_weights.global_specs(cfg):
    x = s.to_ours(ckpt.get(s.hf)).astype(dtype)
    hf_weights.set_path(params, s.path, _put(x, sharding_of(s.path)))
  for g in hf_weights.layer_groups(cfg):
    for s in g.specs(cfg):
      # One host buffer per parameter: [layers of the group, (experts,) ...], filled tensor by
      # tensor (an expert's weight is one HF tensor), put on device, then freed.
      buf = np.empty(((len(g.layers),) if g.stacked else ()) + s.shape, dtype)
      for n, i in enumerate(g.layers):
        dst = buf[n] if g.stacked else buf
        for j in range(max(s.experts, 1)):
          w = s.to_ours(ckpt.get(s.hf_name(i, j)))
          if s.experts:
            dst[j] = w
          else:
            dst[...] = w
      path = g.prefix + s.path
      hf_weights.set_path(params, path, _put(buf, sharding_of(path)))
      del buf
  return params


def copy_tokenizer(hf_dir: str, workdir: str) -> str:
  """Copies the tokenizer files to workdir/tokenizer/ and returns that directory."""
  names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, n))]
  if "tokenizer.json" not in names:
    raise FileNotFoundError(f"{hf_dir}/tokenizer.json not found: llm_jax reads Hugging Face "
                            "tokenizers through tokenizer.json (save one with "
                            "AutoTokenizer.from_pretrained(dir).save_pretrained(dir))")
  out = os.path.join(workdir, "tokenizer")
  os.makedirs(out, exist_ok=True)
  for n in names:
    shutil.copyfile(os.path.join(hf_dir, n), os.path.join(out, n))
  return os.path.abspath(out)


def import_hf(hf_dir: str, workdir: str, base_config: ml_collections.ConfigDict, *,
              dtype: str | None = None, scan_layers: bool | None = None,
              mesh=None) -> ml_collections.ConfigDict:
  """Converts `hf_dir` into the llm_jax run directory `workdir`; returns its config.

  base_config: what the run's config.json holds besides the model (data, train, sharding
    rules...; the command line passes configs/base.py's get_config()).
  dtype: parameter (and compute) dtype of the run; None keeps the checkpoint's own
    (bf16 stays bf16; pass "float32" to fine-tune with float32 master weights).
  scan_layers: layout of the layer parameters; None keeps base_config's.
  mesh: put each tensor straight into its sharding on this mesh (config.sharding_rules);
    None puts everything on one device.
  """
  hf = read_hf_config(hf_dir)
  source = os.path.join(hf_dir, "config.json")
  dtype = dtype or hf_config.hf_dtype(hf) or "float32"
  if dtype not in _NP_DTYPES:
    raise ValueError(f"--dtype={dtype!r}: use one of {sorted(_NP_DTYPES)}")
  config = run_config(hf, source, dtype, scan_layers, base_config)
  cfg = ModelConfig.from_config(config.model)
  shardings = None
  if mesh is not None:
    _, shardings = model_init.abstract(cfg, mesh, config.sharding_rules)
  # Everything that can be wrong with the source is checked before the workdir is written,
  # so a failed import leaves no half-made run directory behind.
  _check_tensors(hf_weights.SafetensorsDir(hf_dir), cfg)
  with workdir_lock.hold(workdir, hint="use another --workdir", jax_processes=True):
    config.data.tokenizer.path = copy_tokenizer(hf_dir, workdir)
    params = load_hf_params(hf_dir, cfg, shardings)
    rundir.save_params(workdir, params, config)
    if jax.process_index() == 0:
      with open(os.path.join(workdir, SOURCE_CONFIG), "w") as f:
        json.dump(hf, f, indent=2)
  n = sum(x.size for x in jax.tree.leaves(params))
  logging.info("imported %s (%s, %.1fM parameters, %s) into %s", hf_dir,
               hf_config.ARCHITECTURES[hf["model_type"]], n / 1e6, dtype, workdir)
  return config


def main():
  f = flags.FLAGS
  scan = None if f.scan_layers is None else f.scan_layers == "true"
  from configs import base  # pylint: disable=g-import-not-at-top (the job defaults)
  import_hf(f.hf_dir, f.workdir, base.get_config(), dtype=f.dtype, scan_layers=scan)


if __name__ == "__main__":
  # Defined here, not at import, so importing this module never clashes with other flags.
  flags.DEFINE_string("hf_dir", None, "local Hugging Face model dir (config.json, *.safetensors)")
  flags.DEFINE_string("workdir", None, "llm_jax run directory to write")
  flags.DEFINE_enum("dtype", None, sorted(_NP_DTYPES), "parameter dtype; default: the checkpoint's")
  flags.DEFINE_enum("scan_layers", None, ["true", "false"], "layer layout; default: configs/base.py's")
  flags.mark_flags_as_required(["hf_dir", "workdir"])
  console.cli(main)
