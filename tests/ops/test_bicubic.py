"""The bicubic ops equal torch ``F.interpolate(mode='bicubic', align_corners=False)`` (SPEC §2.2)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kimi_vl_jax.ops import bicubic

# (in_h, in_w) -> (out_h, out_w): down, up, 1 x N, N x 1, identity, above 64.
SIZES = [
    ((64, 64), (1, 37)),
    ((64, 64), (23, 1)),
    ((64, 64), (64, 64)),
    ((64, 64), (10, 94)),
    ((64, 64), (130, 71)),
    ((16, 16), (7, 40)),
    ((8, 8), (2, 3)),
]


def _torch_resize(table_hwd: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  x = torch.from_numpy(table_hwd).permute(2, 0, 1)[None]
  y = F.interpolate(x, size=(out_h, out_w), mode='bicubic', align_corners=False)
  return y[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize('in_hw,out_hw', SIZES)
def test_resize_2d_matches_torch(in_hw, out_hw):
  rng = np.random.default_rng(0)
  table = rng.normal(size=in_hw + (5,)).astype(np.float32)
  want = _torch_resize(table, *out_hw)
  got = np.asarray(bicubic.resize_2d(jnp.asarray(table), *out_hw))
  chex.assert_shape(got, out_hw + (5,))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_interpolate_at_matches_torch_for_mixed_grids_in_one_graph():
  """Per-sample taps: many grids in one traced call equal torch per grid."""
  rng = np.random.default_rng(1)
  table = rng.normal(size=(64, 64, 6)).astype(np.float32)
  grids = [(1, 37), (23, 1), (64, 64), (10, 94), (130, 71)]
  rows, cols, gh, gw = [], [], [], []
  for h, w in grids:
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
    rows.append(r.ravel()); cols.append(c.ravel())
    gh.append(np.full(h * w, h)); gw.append(np.full(h * w, w))
  args = [np.concatenate(a).astype(np.int32) for a in (rows, cols, gh, gw)]
  got = np.asarray(jax.jit(bicubic.interpolate_at)(jnp.asarray(table), *args))
  start = 0
  for h, w in grids:
    want = _torch_resize(table, h, w).reshape(h * w, -1)
    np.testing.assert_allclose(got[start:start + h * w], want, atol=1e-5, rtol=0,
                               err_msg=f'grid {(h, w)}')
    start += h * w


def test_identity_and_weights_sum_to_one():
  m = bicubic.resize_matrix(64, 64)
  np.testing.assert_array_equal(m, np.eye(64, dtype=np.float32))
  for n_out in (1, 5, 64, 200):
    np.testing.assert_allclose(bicubic.resize_matrix(64, n_out).sum(1), 1.0, atol=1e-6)


def test_differs_from_jax_image_resize():
  """Guards against swapping in jax.image.resize, whose cubic kernel is not torch's."""
  rng = np.random.default_rng(2)
  table = rng.normal(size=(64, 64, 4)).astype(np.float32)
  ours = np.asarray(bicubic.resize_2d(jnp.asarray(table), 20, 90))
  theirs = np.asarray(jax.image.resize(jnp.asarray(table), (20, 90, 4), 'cubic'))
  assert np.abs(ours - theirs).max() > 1e-2


def test_bad_sizes_raise():
  with pytest.raises(ValueError, match='out_size=0'):
    bicubic.resize_matrix(64, 0)
