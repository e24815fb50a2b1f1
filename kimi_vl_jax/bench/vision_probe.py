"""Learnability probe: how fast a from-scratch MoonViT learns a generated image task.

``python -m kimi_vl_jax.bench.vision_probe --views='ocr?tasks=ocr_word&max_side=112;...'``
trains, for each generated view (a ``data.sources`` generated path), a fresh vision tower of
the preset (default ``small``) with a masked-mean pool and a linear head on the view's answers
as class labels (supervised; AdamW, warmup + cosine), on fresh train-split images each step,
and prints held-out (eval split) accuracy every ``--eval_every`` steps. It sizes a demo's
image tasks: a view the tower cannot learn supervised within the budget will not be learned
through CoCa pretraining and SFT either. One view takes ~100 s for 150 steps of 64 images on
2 cores. The last printed line is a JSON object ``{"<view>": {"accuracy": ..,
"chance": .., "steps": .., "images_per_step": ..}}``.
"""
from __future__ import annotations

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import FrozenConfigDict

from kimi_vl_jax.config import base_config
from kimi_vl_jax.data import image_processor as ip
from kimi_vl_jax.data import patch_packing
from kimi_vl_jax.data.generated import get_dataset
from kimi_vl_jax.data.sources import parse_generated_path
from kimi_vl_jax.models.moonvit import MoonViT


class ProbeModel(nn.Module):
  """MoonViT -> masked mean over an image's patches [B, D] -> logits [B, num_classes]."""
  vision: FrozenConfigDict
  num_classes: int

  @nn.compact
  def __call__(self, batch):
    feats = MoonViT(self.vision, name='vision_tower')(
        batch['patches'], batch['segment_ids'], batch['rows'], batch['cols'], batch['grid_h'],
        batch['grid_w'])
    mask = (batch['segment_ids'] > 0)[..., None].astype(jnp.float32)
    pooled = (feats.astype(jnp.float32) * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
    return nn.Dense(self.num_classes, name='head')(pooled)


def _image(record):
  return next(it['image'] for m in record['messages'] for it in m['content']
              if it['type'] == 'image')


class _Batches:
  """Packed one-image rows and class labels; answers get labels in order of appearance."""

  def __init__(self, path: str, split: str, vision_cfg, num_patches: int):
    name, kw = parse_generated_path(path)
    self.ds = get_dataset(name, split, 0, **kw)
    self.image_cfg = ip.ImageProcessorConfig.from_vision_config(vision_cfg)
    self.num_patches = num_patches

  def get(self, start: int, n: int, labels: dict) -> dict:
    packs, ys = [], []
    for i in range(start, start + n):
      record = self.ds[i]
      image = ip.process_image(_image(record), self.image_cfg)
      if image.num_patches > self.num_patches:
        raise ValueError(f'{record["origin"]}: {image.num_patches} patches exceed the probe row '
                         f'of {self.num_patches}; raise --patches')
      packs.append(patch_packing.pack_images([image], self.num_patches))
      ys.append(labels.setdefault(record['answer'], len(labels)))
    batch = patch_packing.stack_packs(packs)
    batch['label'] = np.asarray(ys, np.int32)
    return batch


def probe(path: str, *, steps: int, batch: int, lr: float, eval_n: int, eval_every: int,
          preset: str = 'small', patches: int = 64, num_classes: int = 64, seed: int = 0) -> dict:
  """Trains the probe on one view; returns {'accuracy', 'curve', 'chance', ...}."""
  vision_cfg = base_config(preset).model.vision
  train = _Batches(path, 'train', vision_cfg, patches)
  held_out = _Batches(path, 'eval', vision_cfg, patches)
  labels: dict = {}
  eval_batch = held_out.get(0, eval_n, labels)
  model = ProbeModel(FrozenConfigDict(vision_cfg.to_dict()), num_classes)
  params = model.init(jax.random.PRNGKey(seed), {k: v[:1] for k, v in eval_batch.items()})
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(10, steps), steps, lr * 0.1)
  tx = optax.adamw(schedule, weight_decay=0.0)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, b):
    def loss_fn(p):
      logits = model.apply(p, b)
      return optax.softmax_cross_entropy_with_integer_labels(logits, b['label']).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def accuracy(params, b):
    return (model.apply(params, b).argmax(-1) == b['label']).mean()

  curve, t0 = [], time.perf_counter()
  for s in range(steps):
    b = train.get(s * batch, batch, labels)
    if len(labels) > num_classes:
      raise ValueError(f'{path}: more than {num_classes} distinct answers; raise --num_classes')
    params, opt_state, loss = step(params, opt_state, b)
    if (s + 1) % eval_every == 0 or s + 1 == steps:
      acc = float(accuracy(params, eval_batch))
      curve.append((s + 1, round(acc, 4)))
      print(f'{path}  step {s + 1}  loss {float(loss):.3f}  held-out accuracy {acc:.3f}  '
            f'({time.perf_counter() - t0:.0f} s)', flush=True)
  eval_answers = set(held_out.ds[i]['answer'] for i in range(eval_n))
  return {'accuracy': curve[-1][1], 'curve': curve, 'steps': steps, 'images_per_step': batch,
          'distinct_answers': len(labels), 'chance': round(1.0 / max(len(eval_answers), 1), 4)}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--views', default=(
      'ocr?tasks=ocr_word&max_side=112;'
      'ocr?tasks=ocr_word&min_side=112&max_side=112&max_angle=0&min_fill=0.95;'
      'ocr?tasks=ocr_word&min_side=112&max_side=112&max_angle=0&min_fill=0.95&aspect=2'),
      help='generated paths separated by ";"')
  p.add_argument('--steps', type=int, default=150)
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--lr', type=float, default=1e-3)
  p.add_argument('--eval_n', type=int, default=256)
  p.add_argument('--eval_every', type=int, default=25)
  p.add_argument('--preset', default='small')
  p.add_argument('--patches', type=int, default=64, help='patch slots per row (one image)')
  args = p.parse_args(argv)
  out = {}
  for view in filter(None, (v.strip() for v in args.views.split(';'))):
    out[view] = probe(view, steps=args.steps, batch=args.batch, lr=args.lr, eval_n=args.eval_n,
                      eval_every=args.eval_every, preset=args.preset, patches=args.patches)
  print(json.dumps(out))
  return out


if __name__ == '__main__':
  from kimi_vl_jax import cpu_runtime
  print('cpu runtime:', cpu_runtime.setup())   # before the first computation
  main()
