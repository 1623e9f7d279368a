"""Float comparisons whose tolerance scales with the tensor compared.

A bare `atol` breaks on one float32 ulp of a large element; a bare `rtol` breaks on elements
near zero (a gradient of 1e-7 that comes out 1.2e-7). Here every element may differ from the
reference by at most `rel * max|reference|` (plus `rel * |reference|` elementwise), which is
what accumulated float32 round-off actually looks like.
"""

import numpy as np


def assert_close(actual, desired, rel: float = 1e-5, err_msg: str = "") -> None:
  """|actual - desired| <= rel * (max|desired| + |desired|), elementwise."""
  actual = np.asarray(actual, np.float64)
  desired = np.asarray(desired, np.float64)
  assert actual.shape == desired.shape, f"shapes differ: {actual.shape} vs {desired.shape} {err_msg}"
  scale = float(np.max(np.abs(desired))) if desired.size else 0.0
  np.testing.assert_allclose(actual, desired, rtol=rel, atol=rel * scale, err_msg=err_msg)


def assert_trees_close(actual, desired, rel: float = 1e-5) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  a_leaves, a_def = jax.tree.flatten(actual)
  d_leaves, d_def = jax.tree.flatten(desired)
  assert a_def == d_def, f"tree structures differ: {a_def} vs {d_def}"
  for path_and_a, d in zip(jax.tree_util.tree_flatten_with_path(actual)[0], d_leaves):
    path, a = path_and_a
    assert_close(a, d, rel, err_msg=jax.tree_util.keystr(path))
