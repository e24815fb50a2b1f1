"""bench.vision on the 8 simulated devices: images split over the devices, same loss as torch;
its FLOP accounting against the parameter tree."""
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from kimi_vl_jax.bench import vision
from kimi_vl_jax.config.presets import get_preset
from kimi_vl_jax.models.abstract import abstract_components


def test_matmul_params_are_the_towers_kernels():
  for preset in ('tiny', 'small'):
    model_cfg = get_preset(preset)
    variables = nn.unbox(abstract_components(model_cfg)['vision'][0])
    kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(variables)
               if jax.tree_util.keystr(path).endswith("['kernel']")]
    assert kernels and vision.matmul_params(model_cfg.vision) == sum(
        int(np.prod(k.shape)) for k in kernels), preset


def test_train_flops_counts_each_images_attention():
  vcfg = get_preset('small').vision
  base = 6 * vision.matmul_params(vcfg)
  # A 2-patch and a 3-patch image: attention within each, (2^2 + 3^2) score entries a head.
  attention = 3 * 2 * 2 * (2 ** 2 + 3 ** 2) * vcfg.hidden_size * vcfg.num_hidden_layers
  assert vision.train_flops(vcfg, [2, 3]) == base * 5 + attention


@pytest.mark.slow
def test_bench_runs_data_parallel_and_one_device(capsys):
  out = vision.main(['--preset=tiny', '--rounds=1', '--iters=1'])
  assert out['jax_devices'] == 8   # one per image
  # One image per device: every buffer is as large as the largest image (32x32 patches).
  assert out['real_patches'] == 4360 and out['max_patches'] == 1024
  assert out['packing_efficiency'] == round(4360 / (8 * 1024), 4)
  assert out['jax_one_device_packing_efficiency'] > 0.95
  for key in ('speedup_vs_torch', 'jax_one_device_speedup_vs_torch', 'jax_images_per_s',
              'jax_mfu', 'torch_mfu', 'matmul_peak_gflops'):
    assert out[key] > 0
  sizes = [im.num_patches for im in vision._images(0)]
  assert out['train_gflop_per_step'] == round(
      vision.train_flops(get_preset('tiny').vision, sizes) / 1e9, 2)
  assert out['mfu_needed_for_target'] == pytest.approx(1.5 * out['torch_mfu'], abs=2e-4)
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out


def test_pack_honours_max_patches_and_names_the_flag_when_it_cannot():
  images = vision._images(0)
  batch, slots = vision._pack(images, 2, 2304)
  assert slots == 2304 and batch['segment_ids'].shape == (2, 2304)
  with pytest.raises(ValueError, match='--max_patches=1024: the images need'):
    vision._pack(images, 2, 1024)
