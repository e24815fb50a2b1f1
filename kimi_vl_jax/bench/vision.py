"""Vision-tower benchmark: packed JAX MoonViT vs transformers' torch Kimi_K25VisionModel.

``python -m kimi_vl_jax.bench.vision`` (small preset): a batch of 8 images of mixed sizes up
to 448x448 goes through the host image processor, is packed into one fixed patch buffer, and
both towers (same weights, fp32, same threads) run forward+backward of the same loss
(mean square of the final features) on the same images. Timings exclude compilation and
warm-up; each side is measured in alternating rounds so machine noise hits both equally.
The last printed line is a JSON object.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import FrozenConfigDict
from PIL import Image

from kimi_vl_jax.config import presets
from kimi_vl_jax.convert import hf_vision
from kimi_vl_jax.data import image_processor, patch_packing
from kimi_vl_jax.models.moonvit import MoonViT

# (width, height) in pixels: mixed aspect ratios and sizes up to 448x448.
IMAGE_SIZES = ((448, 448), (448, 336), (224, 448), (392, 280),
               (336, 336), (280, 196), (168, 448), (224, 224))


def _images(seed: int):
  rng = np.random.default_rng(seed)
  pil = [Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)) for w, h in IMAGE_SIZES]
  return image_processor.process_images(pil)


def _torch_tower(vision_cfg, threads: int):
  import torch
  from transformers.models.kimi_k25.configuration_kimi_k25 import Kimi_K25VisionConfig
  from transformers.models.kimi_k25.modeling_kimi_k25 import Kimi_K25VisionModel
  torch.set_num_threads(threads)
  hf_cfg = Kimi_K25VisionConfig(
      hidden_size=vision_cfg.hidden_size, intermediate_size=vision_cfg.intermediate_size,
      num_hidden_layers=vision_cfg.num_hidden_layers,
      num_attention_heads=vision_cfg.num_attention_heads,
      pos_emb_height=vision_cfg.init_pos_emb_height, pos_emb_width=vision_cfg.init_pos_emb_width,
      patch_size=vision_cfg.patch_size,
      rope_parameters={'rope_type': 'axial', 'rope_theta': vision_cfg.rope_theta})
  hf_cfg._attn_implementation = 'sdpa'
  torch.manual_seed(0)
  return Kimi_K25VisionModel(hf_cfg).train()


def _time(fn, iters: int) -> tuple[float, float]:
  """(wall seconds, process CPU seconds) per call; CPU time is steadier on a shared machine."""
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(iters):
    fn()
  return (time.perf_counter() - t0) / iters, (time.process_time() - c0) / iters


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='small')
  parser.add_argument('--iters', type=int, default=3, help='timed steps per round')
  parser.add_argument('--rounds', type=int, default=3, help='alternating JAX/torch rounds')
  parser.add_argument('--threads', type=int, default=0, help='torch threads (0: all cores)')
  # Since each query tile visits only its span of key tiles, 128, 256 and 512 measure within
  # noise of each other here (1072, 1043, 1042 ms), so the preset's own value is the default.
  parser.add_argument('--attention_block_size', type=int, default=0,
                      help="JAX attention tile (0: the preset's vision.attention_block_size)")
  parser.add_argument('--max_patches', type=int, default=0,
                      help='patch slots of the buffer (0: the batch rounded up to 128)')
  args = parser.parse_args(argv)
  import os
  import torch
  threads = args.threads or os.cpu_count() or 1

  model_cfg = presets.get_preset(args.preset)
  if args.attention_block_size:
    model_cfg.vision.attention_block_size = args.attention_block_size
  vcfg = FrozenConfigDict(model_cfg.vision)
  images = _images(0)
  total = sum(im.num_patches for im in images)
  max_patches = args.max_patches or -(-total // 128) * 128
  pack = patch_packing.pack_images(images, max_patches)
  batch = {k: jnp.asarray(v[None]) for k, v in pack.arrays().items()}
  print(f'preset {args.preset}: vision hidden {vcfg.hidden_size}, {vcfg.num_hidden_layers} layers, '
        f'{vcfg.num_attention_heads} heads, attention {vcfg.attention_backend} block '
        f'{vcfg.attention_block_size}; devices {jax.devices()[0].platform} x{jax.device_count()}')
  print(f'images (w x h px -> h x w patches): ' + ', '.join(
      f'{w}x{h}->{im.grid_hw[0]}x{im.grid_hw[1]}' for (w, h), im in zip(IMAGE_SIZES, images)))
  print(f'packed {total} patches into 1 x {max_patches} slots: efficiency {pack.efficiency:.4f}')

  tower = _torch_tower(vcfg, threads)
  state = {k: v.detach().numpy() for k, v in tower.state_dict().items()}
  params = jax.tree.map(jnp.asarray, hf_vision.vision_from_hf(state, vcfg, prefix=''))
  model = MoonViT(vcfg)
  n_real = pack.num_real_patches

  def loss_fn(p, b):
    feats = model.apply({'params': p}, b['patches'], b['segment_ids'], b['rows'], b['cols'],
                        b['grid_h'], b['grid_w'])
    return jnp.sum(jnp.square(feats)) / (n_real * vcfg.hidden_size)

  step = jax.jit(jax.value_and_grad(loss_fn))
  jax_loss, grads = step(params, batch)
  jax.block_until_ready(grads)

  pixels = torch.from_numpy(np.concatenate([im.patches for im in images])).reshape(-1, 3, 14, 14)
  grid_thw = torch.tensor([[1, *im.grid_hw] for im in images])

  def torch_step():
    tower.zero_grad(set_to_none=True)
    out = tower(pixels, grid_thw).last_hidden_state
    loss = out.square().mean()
    loss.backward()
    return loss

  torch_loss = float(torch_step().detach())
  print(f'same loss on both sides: jax {float(jax_loss):.6f} torch {torch_loss:.6f}')

  def jax_run():
    jax.block_until_ready(step(params, batch))

  jax_times, torch_times = [], []
  for _ in range(args.rounds):
    jax_times.append(_time(jax_run, args.iters))
    torch_times.append(_time(torch_step, args.iters))
  jax_s, torch_s = min(t[0] for t in jax_times), min(t[0] for t in torch_times)
  jax_cpu, torch_cpu = min(t[1] for t in jax_times), min(t[1] for t in torch_times)
  n_img = len(images)
  result = {
      'preset': args.preset,
      'num_images': n_img,
      'max_patches': max_patches,
      'real_patches': total,
      'packing_efficiency': round(pack.efficiency, 4),
      'jax_step_s': round(jax_s, 4),
      'torch_step_s': round(torch_s, 4),
      'jax_images_per_s': round(n_img / jax_s, 2),
      'torch_images_per_s': round(n_img / torch_s, 2),
      'speedup_vs_torch': round(torch_s / jax_s, 3),
      'jax_cpu_s_per_step': round(jax_cpu, 4),
      'torch_cpu_s_per_step': round(torch_cpu, 4),
      'cpu_time_ratio': round(torch_cpu / jax_cpu, 3),
      'torch_threads': threads,
      'attention_block_size': vcfg.attention_block_size,
  }
  print(f'fwd+bwd: jax {jax_s * 1e3:.1f} ms/step ({n_img / jax_s:.2f} img/s), torch sdpa '
        f'{torch_s * 1e3:.1f} ms/step ({n_img / torch_s:.2f} img/s): {torch_s / jax_s:.2f}x; '
        f'process CPU s/step jax {jax_cpu:.2f} torch {torch_cpu:.2f}')
  print(json.dumps(result))
  return result


if __name__ == '__main__':
  from kimi_vl_jax import cpu_runtime
  print('cpu runtime:', cpu_runtime.setup())   # before the first computation
  main()
