"""Host-side preprocessing follows SPEC §2.7 and names the image in every error."""
import math

import numpy as np
import pytest
from PIL import Image

from kimi_vl_jax.data import image_processor as ip


def _rgb(w, h, seed=0):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def test_small_image_pads_to_28_and_normalizes():
  img = _rgb(30, 45)                       # -> pad to 56 x 56 px = 4 x 4 patches
  out = ip.process_image(img)
  assert out.grid_hw == (4, 4)
  assert out.patches.shape == (16, 588) and out.patches.dtype == np.float32
  pixels = np.asarray(img, np.float32)
  # Patch (0, 0), channel 1, pixel (3, 5): (x/255 - 0.5)/0.5; (C, 14, 14) flatten order.
  want = (pixels[3, 5, 1] / 255 - 0.5) / 0.5
  assert out.patches[0, 1 * 196 + 3 * 14 + 5] == pytest.approx(want, abs=1e-6)
  # Patch (row 3, col 3) is entirely padding at x >= 30 / y >= 45: black -> -1.
  assert np.all(out.patches[3 * 4 + 3] == -1.0)
  # Patch (row 0, col 2) covers x in [28, 42): x = 28, 29 real, the rest padding.
  p = out.patches[2].reshape(3, 14, 14)
  np.testing.assert_allclose(p[:, :, 2:], -1.0)
  np.testing.assert_allclose(p[0, 0, :2], (pixels[0, 28:30, 0] / 255 - 0.5) / 0.5, atol=1e-6)


def test_token_limit_resize_matches_released_formula():
  cfg = ip.ImageProcessorConfig(in_token_limit=64)
  img = _rgb(300, 170)                     # (300//14)*(170//14) = 21*12 = 252 > 64
  scale = math.sqrt(64 / 252)
  new_w, new_h = int(300 * scale), int(170 * scale)
  assert ip.target_size(300, 170, cfg) == (new_w, new_h)
  out = ip.process_image(img, cfg)
  assert out.grid_hw == (math.ceil(new_h / 28) * 2, math.ceil(new_w / 28) * 2)
  resized = np.asarray(img.resize((new_w, new_h), Image.Resampling.BICUBIC), np.float32)
  got = out.patches.reshape(*out.grid_hw, 3, 14, 14).transpose(0, 3, 1, 4, 2)
  got = got.reshape(out.grid_hw[0] * 14, out.grid_hw[1] * 14, 3)[:new_h, :new_w]
  np.testing.assert_allclose(got, (resized / 255 - 0.5) / 0.5, atol=1e-6)


def test_modes_are_converted_to_rgb():
  gray = Image.fromarray(np.full((20, 20), 128, np.uint8), 'L')
  rgba = Image.fromarray(np.full((20, 20, 4), 255, np.uint8), 'RGBA')
  for img in (gray, rgba, gray.convert('P')):
    out = ip.process_image(img)
    assert out.patches.shape == (4, 588)
  arr = np.full((15, 16, 3), 255, np.uint8)
  assert ip.process_image(arr).grid_hw == (2, 2)


def test_errors_name_the_image(tmp_path):
  bad = tmp_path / 'broken.png'
  bad.write_bytes(b'not a png')
  with pytest.raises(ip.ImageProcessingError, match='broken.png'):
    ip.process_image(str(bad))
  with pytest.raises(ip.ImageProcessingError, match='missing.jpg'):
    ip.process_image(tmp_path / 'missing.jpg')
  with pytest.raises(ip.ImageProcessingError, match=r'image\[1\]: zero-size'):
    ip.process_images([_rgb(20, 20), np.zeros((0, 5, 3), np.uint8)])
  # A limit so large nothing is resized: 7200 px = 515 patches wide -> over 512 per side.
  big = Image.new('RGB', (7200, 28))
  with pytest.raises(ip.ImageProcessingError, match=r'wide\.png.*512 patches per side'):
    ip.process_image(big, ip.ImageProcessorConfig(in_token_limit=10**9), name='wide.png')
  with pytest.raises(ip.ImageProcessingError, match="depth: cannot convert mode 'La'"):
    ip.process_image(Image.new('La', (8, 8)), name='depth')
  with pytest.raises(ip.ImageProcessingError, match='uint8'):
    ip.process_image(np.zeros((4, 4, 3), np.float32))


def test_image_file_and_video_frames(tmp_path):
  path = tmp_path / 'cat.png'
  _rgb(40, 30).save(path)
  from_file = ip.process_image(str(path))
  assert from_file.name == str(path) and from_file.grid_hw == (4, 4)
  np.testing.assert_array_equal(from_file.patches, ip.process_image(_rgb(40, 30)).patches)
  frames = ip.process_video_frames([_rgb(28, 28, 1), _rgb(56, 28, 2)], video_name='clip.mp4')
  assert [f.grid_hw for f in frames] == [(2, 2), (2, 4)]
  assert frames[1].name == 'clip.mp4[frame 1]'
