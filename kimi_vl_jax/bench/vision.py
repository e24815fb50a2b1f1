"""Vision-tower benchmark: packed JAX MoonViT vs transformers' torch Kimi_K25VisionModel.

``python -m kimi_vl_jax.bench.vision [--host_devices N]`` (small preset): a batch of 8 images
of mixed sizes up to 448x448 goes through the host image processor and is packed into fixed
patch buffers; both towers (same weights, fp32) run forward+backward of the same loss (mean
square of the final features) on the same images.

Both sides use every core. torch runs one process with a thread per core. JAX runs data
parallel over one XLA:CPU host device per core (``--host_devices``, default: the core count,
at most one per image): the images are split over the devices into equal buffers
(``patch_packing.assign_balanced``), params are replicated and gradients summed. One XLA:CPU
device runs small dots and loop bodies on one thread, so this keeps both cores of a 2-core
host busy where a single device leaves one idle much of the step. The single-device step
(all images in one buffer) is timed in the same rounds and reported too
(``jax_one_device_*``).

Timings exclude compilation and warm-up; the configurations are measured in alternating
rounds so machine noise hits them equally. The last printed line is a JSON object.

Efficiency: the step's useful FLOPs (``train_flops``: 6 x matmul weights x real patches, plus
each image's attention, forward and twice that backward) over each side's step time, as a
fraction of an fp32 matmul peak measured in the same rounds (``bench.lm.make_matmul_peak``);
``mfu_needed_for_target`` is the fraction the 1.5x target would take (1.5 x torch's).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import FrozenConfigDict
from PIL import Image

from kimi_vl_jax.bench.lm import make_matmul_peak
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


def matmul_params(vcfg) -> int:
  """Weights of the tower that multiply every patch: the patch embedding and, per block, the
  fused qkv, the output projection and the two MLP matrices (no biases, norms or positions)."""
  d, f = vcfg.hidden_size, vcfg.intermediate_size
  patch = vcfg.num_channels * vcfg.patch_size ** 2
  return patch * d + vcfg.num_hidden_layers * (3 * d * d + d * d + 2 * d * f)


def train_flops(vcfg, patches_per_image) -> float:
  """Useful FLOPs of one forward+backward over the images (padding excluded): 6 x matmul
  weights x patches, plus per block and image attention's q k^T and p v, 2 * 2 * P^2 * d
  forward (every head together spans d), 3x that with the backward."""
  patches = np.asarray(patches_per_image, np.float64)
  attention = 3 * 4 * vcfg.hidden_size * np.sum(patches ** 2) * vcfg.num_hidden_layers
  return float(6 * matmul_params(vcfg) * patches.sum() + attention)


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


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='small')
  parser.add_argument('--iters', type=int, default=3, help='timed steps per round')
  parser.add_argument('--rounds', type=int, default=3, help='alternating JAX/torch rounds')
  parser.add_argument('--threads', type=int, default=0, help='torch threads (0: all cores)')
  parser.add_argument('--host_devices', type=int, default=0,
                      help='JAX data-parallel host devices (0: one per core); read before JAX '
                           'starts, unless XLA_FLAGS sets the count')
  # Since each query tile visits only its span of key tiles, 128, 256 and 512 measure within
  # noise of each other here (1072, 1043, 1042 ms), so the preset's own value is the default.
  parser.add_argument('--attention_block_size', type=int, default=0,
                      help="JAX attention tile (0: the preset's vision.attention_block_size)")
  parser.add_argument('--attention_head_groups', type=int, default=0,
                      help="JAX attention passes over slices of the heads (0: the preset's "
                           'vision.attention_head_groups)')
  parser.add_argument('--max_patches', type=int, default=0,
                      help='patch slots per data-parallel buffer (0: the balanced share rounded '
                           'up to 64); the one-device buffer always holds all images')
  return parser


def _pack(images, num_examples: int, max_patches: int):
  """(batch dict of [num_examples, P, ...] arrays, P): images split over the examples."""
  sizes = [im.num_patches for im in images]
  if max_patches:
    groups = patch_packing.assign_first_fit(sizes, max_patches)
    if len(groups) > num_examples:
      raise ValueError(f'--max_patches={max_patches}: the images need {len(groups)} buffers, '
                       f'more than the {num_examples} devices')
    groups += [[] for _ in range(num_examples - len(groups))]
  else:
    groups, max_patches = patch_packing.assign_balanced(sizes, num_examples)
  packs = [patch_packing.pack_images([images[i] for i in g], max_patches) for g in groups]
  return patch_packing.stack_packs(packs), max_patches


def main(argv=None) -> dict:
  args = _parser().parse_args(argv)
  import torch
  threads = args.threads or os.cpu_count() or 1

  model_cfg = presets.get_preset(args.preset)
  if args.attention_block_size:
    model_cfg.vision.attention_block_size = args.attention_block_size
  if args.attention_head_groups:
    model_cfg.vision.attention_head_groups = args.attention_head_groups
  vcfg = FrozenConfigDict(model_cfg.vision)
  images = _images(0)
  total = sum(im.num_patches for im in images)
  n_dev = min(jax.device_count(), len(images))
  devices = jax.devices()[:n_dev]
  print(f'preset {args.preset}: vision hidden {vcfg.hidden_size}, {vcfg.num_hidden_layers} layers, '
        f'{vcfg.num_attention_heads} heads, attention {vcfg.attention_backend} block '
        f'{vcfg.attention_block_size} in {vcfg.attention_head_groups} head group(s); devices {devices[0].platform} x{n_dev}')
  print(f'images (w x h px -> h x w patches): ' + ', '.join(
      f'{w}x{h}->{im.grid_hw[0]}x{im.grid_hw[1]}' for (w, h), im in zip(IMAGE_SIZES, images)))
  configs = {'dp': n_dev} if n_dev == 1 else {'dp': n_dev, 'one_device': 1}
  batches, slots, efficiency = {}, {}, {}
  for name, n in configs.items():
    batch, slots[name] = _pack(images, n, args.max_patches if name == 'dp' else 0)
    efficiency[name] = patch_packing.packing_efficiency(batch['segment_ids'])
    print(f'{name}: packed {total} patches into {n} x {slots[name]} slots: efficiency '
          f'{efficiency[name]:.4f}')
    mesh = Mesh(np.array(devices[:n]), ('data',))
    batches[name] = (mesh, {k: jax.device_put(jnp.asarray(v), NamedSharding(mesh, P('data')))
                            for k, v in batch.items()})

  tower = _torch_tower(vcfg, threads)
  state = {k: v.detach().numpy() for k, v in tower.state_dict().items()}
  params_host = hf_vision.vision_from_hf(state, vcfg, prefix='')
  model = MoonViT(vcfg)

  def loss_fn(p, b):
    feats = model.apply({'params': p}, b['patches'], b['segment_ids'], b['rows'], b['cols'],
                        b['grid_h'], b['grid_w'])
    return jnp.sum(jnp.square(feats)) / (total * vcfg.hidden_size)

  def timed_call(step, params, batch):
    return lambda: jax.block_until_ready(step(params, batch))

  runs, losses = {}, {}
  for name, (mesh, batch) in batches.items():
    replicated = NamedSharding(mesh, P())
    params = jax.device_put(jax.tree.map(jnp.asarray, params_host), replicated)
    step = jax.jit(jax.value_and_grad(loss_fn), out_shardings=replicated)
    loss, grads = step(params, batch)
    jax.block_until_ready(grads)
    losses[name] = float(loss)
    runs[name] = timed_call(step, params, batch)

  pixels = torch.from_numpy(np.concatenate([im.patches for im in images])).reshape(-1, 3, 14, 14)
  grid_thw = torch.tensor([[1, *im.grid_hw] for im in images])

  def torch_step():
    tower.zero_grad(set_to_none=True)
    out = tower(pixels, grid_thw).last_hidden_state
    loss = out.square().mean()
    loss.backward()
    return loss

  torch_loss = float(torch_step().detach())
  print('same loss on both sides: ' + ' '.join(f'jax[{k}] {v:.6f}' for k, v in losses.items())
        + f' torch {torch_loss:.6f}')
  for name, loss in losses.items():   # every configuration times the same computation
    if not np.isclose(loss, torch_loss, rtol=1e-4, atol=0):
      raise RuntimeError(f'jax[{name}] loss {loss} != torch loss {torch_loss}: the towers differ')

  peak_fn = make_matmul_peak()
  times, peaks = {name: [] for name in [*runs, 'torch']}, []
  for _ in range(args.rounds):
    peaks.append(peak_fn())
    for name, fn in [*runs.items(), ('torch', torch_step)]:
      times[name].append(_time(fn, args.iters))
  peak = float(np.median(peaks))
  flops = train_flops(vcfg, [im.num_patches for im in images])
  wall = {k: min(t[0] for t in v) for k, v in times.items()}
  cpu = {k: min(t[1] for t in v) for k, v in times.items()}
  jax_s, torch_s = wall['dp'], wall['torch']
  n_img = len(images)
  result = {
      'preset': args.preset,
      'num_images': n_img,
      'jax_devices': n_dev,
      'max_patches': slots['dp'],
      'real_patches': total,
      'packing_efficiency': round(efficiency['dp'], 4),
      'jax_step_s': round(jax_s, 4),
      'torch_step_s': round(torch_s, 4),
      'jax_images_per_s': round(n_img / jax_s, 2),
      'torch_images_per_s': round(n_img / torch_s, 2),
      'speedup_vs_torch': round(torch_s / jax_s, 3),
      'jax_cpu_s_per_step': round(cpu['dp'], 4),
      'torch_cpu_s_per_step': round(cpu['torch'], 4),
      'cpu_time_ratio': round(cpu['torch'] / cpu['dp'], 3),
      'torch_threads': threads,
      'attention_block_size': vcfg.attention_block_size,
      'attention_head_groups': vcfg.attention_head_groups,
      'train_gflop_per_step': round(flops / 1e9, 2),
      'matmul_peak_gflops': round(peak / 1e9, 1),
      'jax_mfu': round(flops / jax_s / peak, 4),
      'torch_mfu': round(flops / torch_s / peak, 4),
      'mfu_needed_for_target': round(1.5 * flops / torch_s / peak, 4),
  }
  if 'one_device' in wall:
    one = wall['one_device']
    result.update({
        'jax_one_device_step_s': round(one, 4),
        'jax_one_device_images_per_s': round(n_img / one, 2),
        'jax_one_device_speedup_vs_torch': round(torch_s / one, 3),
        'jax_one_device_packing_efficiency': round(efficiency['one_device'], 4),
    })
    print(f'fwd+bwd, jax on one device: {one * 1e3:.1f} ms/step ({n_img / one:.2f} img/s): '
          f'{torch_s / one:.2f}x torch')
  print(f'fwd+bwd: jax ({n_dev} device{"s" if n_dev > 1 else ""}) {jax_s * 1e3:.1f} ms/step '
        f'({n_img / jax_s:.2f} img/s), torch sdpa {torch_s * 1e3:.1f} ms/step '
        f'({n_img / torch_s:.2f} img/s): {torch_s / jax_s:.2f}x; '
        f'process CPU s/step jax {cpu["dp"]:.2f} torch {cpu["torch"]:.2f}')
  print(f'{flops / 1e9:.1f} GFLOP a step; of a {peak / 1e9:.1f} GFLOP/s fp32 matmul peak: jax '
        f'{100 * result["jax_mfu"]:.1f}%, torch {100 * result["torch_mfu"]:.1f}%; 1.5x torch '
        f'would take {100 * result["mfu_needed_for_target"]:.1f}%')
  print(json.dumps(result))
  return result


if __name__ == '__main__':
  from kimi_vl_jax import cpu_runtime
  _known, _ = _parser().parse_known_args()
  # Before the first computation: XLA reads the device count when the CPU client starts.
  cpu_runtime.request_host_devices(_known.host_devices or os.cpu_count() or 1)
  print('cpu runtime:', cpu_runtime.setup())
  main()
