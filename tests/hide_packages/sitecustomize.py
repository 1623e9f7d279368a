"""Put this directory first on PYTHONPATH and the packages named in $HIDE_PACKAGES (comma-separated
import names; default `tensorflow`) are not installed as far as that process can tell, as on a
stock JAX GPU image: importing one raises ModuleNotFoundError and `importlib.util.find_spec` of it
is None (tests/test_writers.py, tests/test_packages.py, tests/test_gpu_suite.py)."""

import importlib.machinery
import os
import sys

HIDDEN = tuple(n for n in os.environ.get("HIDE_PACKAGES", "tensorflow").split(",") if n)


class _Hiding:
  """The path finder, blind to the HIDDEN packages and their submodules."""

  def __init__(self, finder):
    self._finder = finder

  def find_spec(self, name, path=None, target=None):
    if any(name == h or name.startswith(h + ".") for h in HIDDEN):
      return None
    return self._finder.find_spec(name, path, target)

  def __getattr__(self, attr):  # invalidate_caches, find_distributions, ...
    return getattr(self._finder, attr)


sys.meta_path[:] = [_Hiding(f) if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
