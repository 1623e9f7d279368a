"""Dotted field paths of nested configs and results: "train.lr", "model.moe.n_experts".

One way to flatten a nested ConfigDict or dict, read or set a field by its path, and name the
fields a command line sets; the eval job, the notebooks, TensorBoard's hyper-parameters and the
eval tables all use these.
"""

from typing import Any, Iterable, Mapping


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """Every leaf of a nested mapping (ConfigDict or dict) as {"a.b.c": leaf}."""
  out = {}
  for k, v in tree.items():
    if hasattr(v, "items"):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def get(tree: Mapping, path: str) -> Any:
  for p in path.split("."):
    tree = tree[p]
  return tree


def set_path(tree, path: str, value: Any, make=None) -> None:
  """tree[a][b][c] = value for path "a.b.c"; a missing parent is made with `make()` (default:
  KeyError)."""
  *parents, leaf = path.split(".")
  for p in parents:
    if p not in tree and make is not None:
      tree[p] = make()
    tree = tree[p]
  tree[leaf] = value


def explicit_fields(argv: Iterable[str], preset_fields: Iterable[str] = ()) -> set[str]:
  """The config fields a command line sets: `--config.model.dim=256` -> "model.dim"; a model
  preset (`--config=configs/sft.py:minimind-26m`) sets `preset_fields`."""
  out = set()
  for arg in argv:
    if arg.startswith("--config."):
      out.add(arg[len("--config."):].split("=", 1)[0])
    elif arg.startswith("--config=") and ":" in arg:
      out.update(preset_fields)
  return out
