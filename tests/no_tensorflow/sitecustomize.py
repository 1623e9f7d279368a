"""Put this directory first on PYTHONPATH and TensorFlow is not installed as far as that process
can tell, as on a stock JAX GPU image: `import tensorflow` raises ModuleNotFoundError and
`importlib.util.find_spec("tensorflow")` is None (tests/test_writers.py, tests/test_gpu_suite.py)."""

import importlib.machinery
import sys

HIDDEN = ("tensorflow",)


class _Hiding:
  """The path finder, blind to the HIDDEN top-level packages and their submodules."""

  def __init__(self, finder):
    self._finder = finder

  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in HIDDEN:
      return None
    return self._finder.find_spec(name, path, target)

  def __getattr__(self, attr):  # invalidate_caches, find_distributions, ...
    return getattr(self._finder, attr)


sys.meta_path[:] = [_Hiding(f) if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
