"""The packages llm_jax needs, and one line naming a missing one with the pip command that installs it.

`python -m llm_jax.<command>` checks the REQUIRED packages before the command's own imports run
(llm_jax/__init__.py calls `check_command` while Python locates the command's module), so a
machine without, say, grain and clu gets

  error: llm_jax needs grain, clu, which are not installed here: pip install grain==0.2.18 clu==0.0.12

and exit status 1 instead of a traceback. A package only one feature needs (OPTIONAL: `tfds:`
sources, the server, data synthesis, plots, Hugging Face files) is asked for where that feature
starts (`require`), and an import of it, or of a dependency in DEPENDENCIES, that fails anywhere in
a command ends the same way (one line, the pip command; `--verbose` keeps the traceback).

Standard library only: this runs before anything else can be imported. The pins are those of
requirements.txt (tests/test_packages.py keeps them equal); a machine with other versions
(jax 0.11 on a GPU image) only needs the package to be there.
"""

import importlib.util
import sys

# import name -> (pip distribution, version pinned in requirements.txt): every command needs them.
REQUIRED = {
    "jax": ("jax", "0.10.2"),
    "jaxlib": ("jaxlib", "0.10.2"),
    "flax": ("flax", "0.12.8"),
    "optax": ("optax", "0.2.8"),
    "orbax.checkpoint": ("orbax-checkpoint", "0.12.8"),
    "grain": ("grain", "0.2.18"),
    "array_record": ("array-record", "0.8.6"),
    "ml_collections": ("ml-collections", "1.1.0"),
    "clu": ("clu", "0.0.12"),
    "sentencepiece": ("sentencepiece", "0.2.3"),
    "absl": ("absl-py", "2.5.1"),
    "numpy": ("numpy", "2.4.6"),
    "tensorboard": ("tensorboard", "2.21.0"),
}

# import name -> (pip distribution, pinned version or "" where requirements.txt has none, what needs it)
OPTIONAL = {
    "tensorflow_datasets": ("tensorflow-datasets", "4.9.10", "tfds: data sources"),
    "tensorflow": ("tensorflow-cpu", "2.21.0", "TensorBoard events in gs:// work directories"),
    "pyarrow": ("pyarrow", "26.0.1", "Parquet data files"),
    "safetensors": ("safetensors", "0.8.0", "Hugging Face import and export"),
    "tokenizers": ("tokenizers", "0.23.3", "Hugging Face tokenizer.json tokenizers"),
    "gguf": ("gguf", "0.19.0", "GGUF export for llama.cpp and Ollama, llm_jax.convert.gguf_export"),
    "openai": ("openai", "3.54.0", "SFT data synthesis, llm_jax.data.synth"),
    "json_repair": ("json-repair", "0.64.5", "SFT data synthesis, llm_jax.data.synth"),
    "tenacity": ("tenacity", "9.2.1", "SFT data synthesis, llm_jax.data.synth"),
    "matplotlib": ("matplotlib", "3.11.2", "eval plots"),
    "fastapi": ("fastapi", "0.165.0", "the server, llm_jax.serve"),
    "uvicorn": ("uvicorn", "0.54.0", "the server, llm_jax.serve"),
    "wandb": ("wandb", "0.31.0", "Weights & Biases logging, config.metrics.wandb_project"),
}

# Dependencies of the packages above that a partial install (`pip install --no-deps`, wheels
# carried to an offline machine) can miss: import name -> pip distribution.
DEPENDENCIES = {
    "yaml": "PyYAML", "wrapt": "wrapt", "etils": "etils", "cloudpickle": "cloudpickle",
    "portpicker": "portpicker", "psutil": "psutil", "google.protobuf": "protobuf",
    "msgpack": "msgpack", "tensorstore": "tensorstore", "chex": "chex", "toolz": "toolz",
    "simple_parsing": "simple-parsing", "immutabledict": "immutabledict", "tree": "dm-tree",
}


class MissingPackage(ImportError):
  """A package a feature needs is not installed; the message names it and the pip command."""


def _installed(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except (ImportError, ValueError):  # a parent package missing, or a module without a spec
    return False


def pip_spec(name: str) -> str:
  """"grain==0.2.18" for an import name of REQUIRED or OPTIONAL; the distribution alone for one of
  DEPENDENCIES (or an unknown name)."""
  if name in REQUIRED:
    dist, version = REQUIRED[name]
  elif name in OPTIONAL:
    dist, version, _ = OPTIONAL[name]
  else:
    return DEPENDENCIES.get(name, name)
  return f"{dist}=={version}" if version else dist


def missing(names=None) -> list[str]:
  """The import names of `names` (default: REQUIRED) that are not installed, in order."""
  return [n for n in (REQUIRED if names is None else names) if not _installed(n)]


def missing_line(names: list[str]) -> str:
  dists = ", ".join(REQUIRED[n][0] if n in REQUIRED else pip_spec(n).split("==")[0] for n in names)
  which = "which is" if len(names) == 1 else "which are"
  return (f"llm_jax needs {dists}, {which} not installed here: pip install "
          f"{' '.join(pip_spec(n) for n in names)} (or pip install -r requirements.txt)")


def _optional_line(name: str) -> str:
  dist, _, needed_by = OPTIONAL[name]
  return f"{dist} (for {needed_by}) is not installed here: pip install {pip_spec(name)}"


def require(name: str) -> None:
  """Raises MissingPackage naming the pip command when the OPTIONAL package `name` is absent."""
  if not _installed(name):
    raise MissingPackage(_optional_line(name))


def _known(module: str) -> str | None:
  """The name in REQUIRED, OPTIONAL or DEPENDENCIES that a missing module belongs to."""
  for table in (REQUIRED, OPTIONAL, DEPENDENCIES):
    for name in table:
      if module == name or module.startswith(name + "."):
        return name
  top = module.split(".")[0]
  return top if top in DEPENDENCIES else None


def one_line(exc: BaseException) -> str | None:
  """The one line for an exception that means "a package is missing", else None."""
  if isinstance(exc, MissingPackage):
    return str(exc)
  if isinstance(exc, ModuleNotFoundError) and exc.name:
    name = _known(exc.name)
    if name is None:
      return None
    if name in REQUIRED:
      return missing_line([name])
    if name in OPTIONAL:
      return _optional_line(name)
    return (f"{DEPENDENCIES[name]} (imported as {exc.name}) is not installed here: pip install "
            f"{DEPENDENCIES[name]}")
  return None


def _excepthook(previous):
  def hook(exc_type, exc, tb):
    line = one_line(exc)
    if line is None or "--verbose" in sys.argv:
      previous(exc_type, exc, tb)
      return
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()
  return hook


def check_command() -> None:
  """For `python -m llm_jax.<command>`: one line and exit status 1 when a REQUIRED package is
  missing; an uncaught missing-package error later in the command also ends in one line."""
  absent = missing()
  if absent:
    sys.stderr.write(f"error: {missing_line(absent)}\n")
    sys.exit(1)
  if not getattr(sys.excepthook, "_llm_jax", False):
    sys.excepthook = _excepthook(sys.excepthook)
    sys.excepthook._llm_jax = True  # pylint: disable=protected-access
