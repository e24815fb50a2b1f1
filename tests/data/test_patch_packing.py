"""Multi-image packing: merge-block order, metadata, token counts, efficiency and errors."""
import numpy as np
import pytest

from kimi_vl_jax.data import patch_packing as pp
from kimi_vl_jax.data.image_processor import ProcessedImage


def _image(h, w, seed=0):
  """Patches whose value encodes (row, col) so the order can be checked: [h*w, 4]."""
  r, c = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  return np.stack([r.ravel(), c.ravel(), np.full(h * w, seed), np.zeros(h * w)], -1).astype(np.float32), (h, w)


def test_merge_block_order_of_one_image():
  rows, cols = pp.merge_block_coords(4, 6)
  # Token (R, C) owns 4 consecutive slots (2R,2C) (2R,2C+1) (2R+1,2C) (2R+1,2C+1); raster over (R, C).
  assert list(zip(rows[:8], cols[:8])) == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
  assert list(zip(rows[12:16], cols[12:16])) == [(2, 0), (2, 1), (3, 0), (3, 1)]
  assert len(set(zip(rows, cols))) == 24


def test_pack_layout_and_metadata():
  images = [_image(2, 4, 1), _image(4, 2, 2), ProcessedImage(*_image(2, 2, 3), name='x')]
  pack = pp.pack_images(images, max_patches=24, patch_dim=4)
  assert pack.num_tokens == (2, 2, 1)
  np.testing.assert_array_equal(pack.segment_ids, [1] * 8 + [2] * 8 + [3] * 4 + [0] * 4)
  # Stored patch content equals its recorded (row, col), i.e. patches moved with their coordinates.
  real = pack.segment_ids > 0
  np.testing.assert_array_equal(pack.patches[real, 0], pack.rows[real])
  np.testing.assert_array_equal(pack.patches[real, 1], pack.cols[real])
  np.testing.assert_array_equal(pack.patches[real, 2], pack.segment_ids[real])
  np.testing.assert_array_equal(pack.grid_h, [2] * 8 + [4] * 8 + [2] * 4 + [0] * 4)
  np.testing.assert_array_equal(pack.grid_w, [4] * 8 + [2] * 8 + [2] * 4 + [0] * 4)
  assert np.all(pack.patches[~real] == 0)
  assert pack.efficiency == pytest.approx(20 / 24)
  # Pixel shuffle is a reshape: group k of 4 slots = the k-th LM token, segment of its image.
  token_seg = pack.segment_ids.reshape(-1, 4)[:, 0]
  np.testing.assert_array_equal(token_seg, [1, 1, 2, 2, 3, 0])
  assert np.all(pack.segment_ids.reshape(-1, 4) == token_seg[:, None])


def test_stack_and_efficiency():
  a = pp.pack_images([_image(2, 2)], 8, patch_dim=4)
  b = pp.pack_images([_image(2, 4)], 8, patch_dim=4)
  batch = pp.stack_packs([a, b])
  assert set(batch) == set(pp.PATCH_FIELDS)
  assert batch['patches'].shape == (2, 8, 4) and batch['segment_ids'].shape == (2, 8)
  assert pp.packing_efficiency(batch['segment_ids']) == pytest.approx(12 / 16)
  empty = pp.pack_images([], 8, patch_dim=4)
  assert empty.num_tokens == () and empty.efficiency == 0.0
  with pytest.raises(pp.PackingError, match='different max_patches'):
    pp.stack_packs([a, pp.pack_images([], 12, patch_dim=4)])


def test_errors_are_clear():
  with pytest.raises(pp.PackingError, match=r'need 24 patches.*max_patches=20.*image\[1\] 4x4'):
    pp.pack_images([_image(2, 4), _image(4, 4)], 20)
  with pytest.raises(pp.PackingError, match='multiple of 4'):
    pp.pack_images([_image(2, 2)], 10)
  with pytest.raises(pp.PackingError, match=r'image\[0\].*not divisible'):
    pp.pack_images([_image(3, 2)], 8)
  with pytest.raises(pp.PackingError, match=r'image\[0\].*do not match grid'):
    pp.pack_images([(np.zeros((5, 4)), (2, 2))], 8)


def test_first_fit_assignment():
  sizes = [40, 8, 30, 20, 12, 50]
  bins = pp.assign_first_fit(sizes, 64)
  assert sorted(i for b in bins for i in b) == list(range(6))
  assert all(sum(sizes[i] for i in b) <= 64 for b in bins)
  assert len(bins) == 3
  with pytest.raises(pp.PackingError, match=r'image\[5\] has 50 patches'):
    pp.assign_first_fit(sizes, 48)


def test_balanced_assignment_over_a_fixed_number_of_examples():
  # bench.vision's mix (patches per image): two examples of 2240 slots, 97.3% full.
  sizes = [1024, 768, 512, 560, 576, 280, 384, 256]
  bins, size = pp.assign_balanced(sizes, 2)
  assert size == 2240 and len(bins) == 2
  assert sorted(i for b in bins for i in b) == list(range(8))
  assert all(sum(sizes[i] for i in b) <= size for b in bins)
  # One example: everything in one buffer of the total rounded up.
  assert pp.assign_balanced(sizes, 1) == ([list(range(8))], 4416)
  # A share that first-fit cannot meet grows by the multiple until the images fit.
  bins, size = pp.assign_balanced([60, 60, 60], 2, multiple=8)
  assert size == 120 and sorted(len(b) for b in bins) == [1, 2]
  # More examples than images: the extra examples are empty, the buffer fits the largest.
  bins, size = pp.assign_balanced([16, 8], 4, multiple=8)
  assert size == 16 and bins == [[0], [1], [], []]
  images = [_image(4, 4), _image(2, 4)]
  packs = [pp.pack_images([images[i] for i in b], size, patch_dim=4) for b in bins]
  assert pp.stack_packs(packs)['segment_ids'].shape == (4, 16)
  with pytest.raises(pp.PackingError, match='num_examples'):
    pp.assign_balanced(sizes, 0)
