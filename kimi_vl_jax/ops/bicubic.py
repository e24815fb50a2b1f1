"""PyTorch-exact bicubic resampling (``F.interpolate(mode='bicubic', align_corners=False)``).

MoonViT resizes its learned (H, W, D) position table to every image's patch grid with
torch's bicubic kernel (SPEC §2.2). ``jax.image.resize(..., 'cubic')`` uses a different
kernel (Keys A = -0.5 with antialias handling) and differs by up to ~2.6, so the taps and
weights are built here from the torch recipe, per axis with ``n_in`` source and ``n_out``
target samples:

  scale = n_in / n_out                      (fp32, as torch's ``area_pixel_compute_scale``)
  src   = scale * (o + 0.5) - 0.5           (no clamp at 0 for cubic)
  i0    = floor(src), t = src - i0
  taps  = clamp(i0 - 1 .. i0 + 2, 0, n_in - 1)   (border taps accumulate)
  w     = [k(t + 1), k(t), k(1 - t), k(2 - t)], Keys cubic kernel k with A = -0.75

Two forms, both jit-static:
- ``resize_matrix(n_in, n_out)``: a dense [n_out, n_in] numpy matrix for static sizes
  (``resize_2d`` applies it along both axes).
- ``bicubic_taps`` / ``interpolate_at``: per-sample taps from *traced* coordinates and
  target sizes, so one compiled function serves any mix of image grids (MoonViT's packed
  patches each carry their own (row, col) and (h, w)).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CUBIC_A = -0.75


def cubic_kernel_weights(t, xp=jnp):
  """Keys cubic weights of the 4 taps ``i0-1 .. i0+2`` for fractional offsets ``t``.

  Args:
    t: [...] float32 fractional part of the source coordinate, in [0, 1).
    xp: ``jnp`` or ``np``.
  Returns:
    [..., 4] float32 weights (they sum to 1).
  """
  a = CUBIC_A

  def near(x):  # |x| <= 1
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a

  return xp.stack([far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)], axis=-1)


def bicubic_taps(out_index, out_size, in_size: int, xp=jnp):
  """Source taps and weights of output samples ``out_index`` of an axis of ``out_size``.

  Args:
    out_index: [...] integer output coordinates (traced is fine).
    out_size: [...] or scalar integer output length of the axis (traced is fine).
    in_size: static source length.
    xp: ``jnp`` or ``np``.
  Returns:
    (taps [..., 4] int32 in [0, in_size - 1], weights [..., 4] float32).
  """
  f32 = xp.float32
  # Same fp32 operation order as torch: scale = in / out; src = scale * (o + 0.5) - 0.5.
  scale = xp.asarray(in_size, f32) / xp.asarray(out_size).astype(f32)
  src = scale * (xp.asarray(out_index).astype(f32) + f32(0.5)) - f32(0.5)
  i0 = xp.floor(src)
  t = src - i0
  offsets = xp.arange(-1, 3, dtype=xp.int32)
  taps = xp.clip(i0.astype(xp.int32)[..., None] + offsets, 0, in_size - 1)
  return taps, cubic_kernel_weights(t, xp).astype(f32)


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """Dense [out_size, in_size] float32 matrix M with ``y = M @ x`` the torch bicubic resize."""
  if in_size < 1 or out_size < 1:
    raise ValueError(f'bicubic resize needs positive sizes, got in_size={in_size}, out_size={out_size}')
  taps, weights = bicubic_taps(np.arange(out_size), out_size, in_size, xp=np)
  m = np.zeros((out_size, in_size), np.float32)
  # Border taps repeat an index: np.add.at accumulates them (torch's clamped access does too).
  np.add.at(m, (np.repeat(np.arange(out_size), 4), taps.reshape(-1)), weights.reshape(-1))
  return m


def resize_2d(x_hwd: jax.Array, out_h: int, out_w: int) -> jax.Array:
  """Resizes [H, W, D] to [out_h, out_w, D] (static sizes), computed in fp32."""
  h, w = x_hwd.shape[:2]
  m_oh = jnp.asarray(resize_matrix(h, out_h))
  m_ow = jnp.asarray(resize_matrix(w, out_w))
  x = x_hwd.astype(jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  y = jnp.einsum('oh,hwd->owd', m_oh, x, precision=hp)
  return jnp.einsum('pw,owd->opd', m_ow, y, precision=hp)


def interpolate_at(table_hwd: jax.Array, row_n, col_n, grid_h_n, grid_w_n) -> jax.Array:
  """Value of the table resized to (grid_h, grid_w), sampled at (row, col), per sample.

  Equivalent to ``resize_2d(table, grid_h[n], grid_w[n])[row[n], col[n]]`` for each n, but
  with traced coordinates and grid sizes (a single compiled graph for any image-size mix):
  16 gathers of table rows weighted by the separable 4x4 bicubic taps.

  Args:
    table_hwd: [H, W, D] source table.
    row_n, col_n: [N] int output coordinates.
    grid_h_n, grid_w_n: [N] int output grid sizes (>= 1; use 1 for padding samples).
  Returns:
    [N, D] float32.
  """
  in_h, in_w, d = table_hwd.shape
  table = table_hwd.astype(jnp.float32).reshape(in_h * in_w, d)
  r_taps, r_w = bicubic_taps(row_n, grid_h_n, in_h)    # [N, 4]
  c_taps, c_w = bicubic_taps(col_n, grid_w_n, in_w)    # [N, 4]
  out = jnp.zeros(r_taps.shape[:-1] + (d,), jnp.float32)
  # Separable like torch: interpolate 4 rows along the width, then combine them along the height.
  for i in range(4):
    row_acc = jnp.zeros_like(out)
    for j in range(4):
      row_acc = row_acc + c_w[..., j:j + 1] * table[r_taps[..., i] * in_w + c_taps[..., j]]
    out = out + r_w[..., i:i + 1] * row_acc
  return out
