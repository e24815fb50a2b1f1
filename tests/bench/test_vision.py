"""bench.vision on the 8 simulated devices: images split over the devices, same loss as torch."""
import json

import pytest

from kimi_vl_jax.bench import vision


@pytest.mark.slow
def test_bench_runs_data_parallel_and_one_device(capsys):
  out = vision.main(['--preset=tiny', '--rounds=1', '--iters=1'])
  assert out['jax_devices'] == 8   # one per image
  # One image per device: every buffer is as large as the largest image (32x32 patches).
  assert out['real_patches'] == 4360 and out['max_patches'] == 1024
  assert out['packing_efficiency'] == round(4360 / (8 * 1024), 4)
  assert out['jax_one_device_packing_efficiency'] > 0.95
  for key in ('speedup_vs_torch', 'jax_one_device_speedup_vs_torch', 'jax_images_per_s'):
    assert out[key] > 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out


def test_pack_honours_max_patches_and_names_the_flag_when_it_cannot():
  images = vision._images(0)
  batch, slots = vision._pack(images, 2, 2304)
  assert slots == 2304 and batch['segment_ids'].shape == (2, 2304)
  with pytest.raises(ValueError, match='--max_patches=1024: the images need'):
    vision._pack(images, 2, 1024)
