"""Grouped matrix multiplication: rows of `lhs` sorted by group, each group times its own matrix.

  out[r] = lhs[r] @ rhs[g(r)]   for r < sum(group_sizes), g(r) the group row r falls in
  out[r] = 0                    for the rows after the last group

The one wrapper around the fast-moving library API (jax.lax.ragged_dot), with a CPU kernel:

  ragged_dot  `jax.lax.ragged_dot`: a native grouped GEMM on GPU and TPU. On CPU, jax 0.10.2
              lowers it to a dense matmul of every row with every group (G times the work).
  tiled       a scan over (row tile, group) pairs with a custom VJP (megablox's schedule in
              plain XLA): about sum(group_sizes) + G * tile rows of work; the CPU choice.
  auto        tiled on CPU, ragged_dot elsewhere.

Shape letters here follow the matmul convention, not the model's legend (model/__init__.py):
lhs_MxK @ rhs_GxKxN -> out_MxN, G groups, T rows of a tile.
"""

import functools

import jax
import jax.numpy as jnp


def auto_tile(n_rows: int, n_groups: int) -> int:
  """Rows per tile for the tiled kernel: about the mean group size (a tile shared by two groups is
  computed twice, so small groups want small tiles), a power of two in [16, 256]."""
  mean = max(n_rows // max(n_groups, 1), 1)
  return min(256, max(16, 1 << (mean - 1).bit_length()))


def grouped_matmul(lhs_MxK: jax.Array, rhs_GxKxN: jax.Array, group_sizes_G: jax.Array, *,
                   impl: str = "auto", tile: int = 0, out_dtype=None) -> jax.Array:
  """[M, N] = each group's rows of lhs times that group's [K, N] matrix (see module docstring).
  tile: rows per tile of the tiled kernel; 0 = auto_tile."""
  out_dtype = out_dtype or lhs_MxK.dtype
  tile = tile or auto_tile(lhs_MxK.shape[0], rhs_GxKxN.shape[0])
  if impl == "auto":
    impl = "tiled" if jax.default_backend() == "cpu" else "ragged_dot"
  if impl == "ragged_dot":
    out_MxN = jax.lax.ragged_dot(lhs_MxK, rhs_GxKxN, group_sizes_G, preferred_element_type=out_dtype)
    # Rows past the groups: zero on every backend, not left to the lowering.
    in_group_M = jnp.arange(lhs_MxK.shape[0]) < jnp.sum(group_sizes_G)
    return jnp.where(in_group_M[:, None], out_MxN, 0).astype(out_dtype)
  if impl == "tiled":
    return _tiled_gmm(lhs_MxK, rhs_GxKxN, group_sizes_G.astype(jnp.int32), tile, out_dtype)
  raise ValueError(f"unknown grouped matmul implementation {impl!r}")


def _schedule(group_sizes_G, n_tiles: int, tile: int):
  """The (group, row tile) pairs to compute, padded to the static bound n_tiles + G - 1.

  Group g covers rows [start_g, end_g) and so tiles start_g // tile .. (end_g - 1) // tile; a tile
  shared by two groups is visited once per group with the other group's rows masked out.
  """
  n_groups = group_sizes_G.shape[0]
  end_G = jnp.cumsum(group_sizes_G)
  start_G = end_G - group_sizes_G
  first_G = start_G // tile
  visits_G = jnp.where(group_sizes_G > 0, (end_G - 1) // tile - first_G + 1, 0)
  visit_end_G = jnp.cumsum(visits_G)
  n_visits = n_tiles + n_groups - 1
  v_V = jnp.arange(n_visits)
  group_V = jnp.minimum(jnp.searchsorted(visit_end_G, v_V, side="right"), n_groups - 1)
  tile_V = first_G[group_V] + v_V - (visit_end_G - visits_G)[group_V]
  live_V = v_V < visit_end_G[-1]
  return group_V, jnp.where(live_V, tile_V, 0), live_V, start_G, end_G


def _tile_rows(x_MxK, i, tile, group, start_G, end_G):
  """Row tile i of x with the rows outside `group` zeroed."""
  rows_T = i * tile + jnp.arange(tile)
  mine_T = (rows_T >= start_G[group]) & (rows_T < end_G[group])
  x_TxK = jax.lax.dynamic_slice_in_dim(x_MxK, i * tile, tile)
  return jnp.where(mine_T[:, None], x_TxK, 0)


def _pad_rows(x, tile):
  pad = -x.shape[0] % tile
  return jnp.pad(x, ((0, pad), (0, 0))) if pad else x


def _gmm_loop(lhs_MxK, rhs_GxKxN, group_sizes_G, tile, out_dtype, transpose_rhs=False):
  m = lhs_MxK.shape[0]
  lhs_PxK = _pad_rows(lhs_MxK, tile)
  n = rhs_GxKxN.shape[1] if transpose_rhs else rhs_GxKxN.shape[2]
  group_V, tile_V, live_V, start_G, end_G = _schedule(group_sizes_G, lhs_PxK.shape[0] // tile, tile)
  dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

  def visit(out_PxN, xs):
    group, i, live = xs

    def compute(out_PxN):
      x_TxK = _tile_rows(lhs_PxK, i, tile, group, start_G, end_G)
      y_TxN = jax.lax.dot_general(x_TxK, rhs_GxKxN[group], dims, preferred_element_type=jnp.float32)
      acc_TxN = jax.lax.dynamic_slice_in_dim(out_PxN, i * tile, tile) + y_TxN
      return jax.lax.dynamic_update_slice_in_dim(out_PxN, acc_TxN, i * tile, 0)
    return jax.lax.cond(live, compute, lambda o: o, out_PxN), None

  out_PxN = jnp.zeros((lhs_PxK.shape[0], n), jnp.float32)
  out_PxN, _ = jax.lax.scan(visit, out_PxN, (group_V, tile_V, live_V))
  return out_PxN[:m].astype(out_dtype)


def _tgmm_loop(lhs_MxK, grad_MxN, group_sizes_G, tile, out_dtype):
  """d rhs: [G, K, N] with d rhs[g] = lhs[rows of g]^T @ grad[rows of g]."""
  lhs_PxK, grad_PxN = _pad_rows(lhs_MxK, tile), _pad_rows(grad_MxN, tile)
  n_groups = group_sizes_G.shape[0]
  group_V, tile_V, live_V, start_G, end_G = _schedule(group_sizes_G, lhs_PxK.shape[0] // tile, tile)

  def visit(out_GxKxN, xs):
    group, i, live = xs

    def compute(out_GxKxN):
      x_TxK = _tile_rows(lhs_PxK, i, tile, group, start_G, end_G)
      g_TxN = jax.lax.dynamic_slice_in_dim(grad_PxN, i * tile, tile)
      d_KxN = jax.lax.dot_general(x_TxK, g_TxN, (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)
      return jax.lax.dynamic_update_index_in_dim(out_GxKxN, out_GxKxN[group] + d_KxN, group, 0)
    return jax.lax.cond(live, compute, lambda o: o, out_GxKxN), None

  shape = (n_groups, lhs_MxK.shape[1], grad_MxN.shape[1])
  out_GxKxN, _ = jax.lax.scan(visit, jnp.zeros(shape, jnp.float32), (group_V, tile_V, live_V))
  return out_GxKxN.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _tiled_gmm(lhs_MxK, rhs_GxKxN, group_sizes_G, tile, out_dtype):
  return _gmm_loop(lhs_MxK, rhs_GxKxN, group_sizes_G, tile, out_dtype)


def _tiled_gmm_fwd(lhs_MxK, rhs_GxKxN, group_sizes_G, tile, out_dtype):
  out = _gmm_loop(lhs_MxK, rhs_GxKxN, group_sizes_G, tile, out_dtype)
  return out, (lhs_MxK, rhs_GxKxN, group_sizes_G)


def _tiled_gmm_bwd(tile, out_dtype, res, grad_MxN):
  del out_dtype
  lhs_MxK, rhs_GxKxN, group_sizes_G = res
  grad_MxN = grad_MxN.astype(lhs_MxK.dtype)
  d_lhs = _gmm_loop(grad_MxN, rhs_GxKxN, group_sizes_G, tile, lhs_MxK.dtype, transpose_rhs=True)
  d_rhs = _tgmm_loop(lhs_MxK, grad_MxN, group_sizes_G, tile, rhs_GxKxN.dtype)
  return d_lhs, d_rhs, None


_tiled_gmm.defvjp(_tiled_gmm_fwd, _tiled_gmm_bwd)
