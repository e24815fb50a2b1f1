"""Stages: resolve ``config.stages.<name>`` blocks into what one stage runs (SPEC §6).

A stage block says what changes relative to ``config.train`` / ``config.optim`` /
``config.model`` (0, -1 and '' inherit). ``resolve(config, name)`` returns a ``Stage`` with the
concrete budget, batch shape, model config (e.g. rope theta 50k -> 800k in long context),
optimizer block (peak/end lr, warmup, schedule, trainable patterns) and the data schedule
(text-only warm-up then a rising multimodal share; long/short mix; progressive resolution).

Stages run in ``STAGE_NAMES`` order; each starts from the previous enabled stage's last
checkpoint, loading parameters by path (``transfer_params``), so the ViT of ``vit_pretrain``
(``vision_tower/...``) lands in the Kimi-VL model's ``vision_tower``.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
from typing import Any, Optional, Sequence

import ml_collections

from kimi_vl_jax.config.base import STAGE_NAMES
from kimi_vl_jax.config.validate import ConfigError, register_check, resolve_mesh_shape

TASKS = ('kimi_vl', 'lm', 'vit_pretrain', 'rl')
EVALS = ('vqa', 'ocr', 'counting', 'caption_ppl', 'needle')


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  index: int
  block: Any                 # the stage's ConfigDict
  task: str
  steps: int
  global_batch: int
  microbatches: int          # gradient accumulation steps of one train step
  seq_len: int
  patches_per_row: int       # patch slots per packed row (images of a row share them)
  model: Any                 # model config with this stage's changes
  optim: Any                 # optim config with this stage's lr / schedule / trainable
  trainable: tuple
  router_bias_rate: float

  def multimodal_share(self, step: int) -> float:
    """Fraction of rows with images at ``step`` (0 during the text-only warm-up)."""
    b = self.block
    warm = int(round(b.text_only_fraction * self.steps))
    if step < warm:
      return 0.0
    span = max(self.steps - warm, 1)
    t = min(max((step - warm) / span, 0.0), 1.0)
    return float(b.multimodal_share_start + t * (b.multimodal_share_end - b.multimodal_share_start))

  def max_image_side(self, step: int, default: int) -> int:
    """Progressive resolution: the max image side of the phase that ``step`` falls in."""
    sides = tuple(self.block.image_sides)
    if not sides:
      return default
    phase = min(step * len(sides) // max(self.steps, 1), len(sides) - 1)
    return int(sides[phase])


def enabled_stages(config, selected: Optional[Sequence[str]] = None) -> list[str]:
  names = [n for n in STAGE_NAMES if config.stages[n].enabled]
  if selected:
    unknown = [s for s in selected if s not in STAGE_NAMES]
    if unknown:
      raise ConfigError(f'--stages: unknown stage(s) {unknown}; known: {", ".join(STAGE_NAMES)}')
    names = [n for n in names if n in selected]
  return names


def previous_stage(config, name: str) -> Optional[str]:
  names = [n for n in STAGE_NAMES if config.stages[n].enabled]
  i = names.index(name)
  return names[i - 1] if i > 0 else None


def resolve(config, name: str) -> Stage:
  b = config.stages[name]
  t, o = config.train, config.optim
  batch = b.global_batch or t.global_batch
  seq = t.seq_len * b.seq_len_scale
  steps = b.steps or math.ceil(b.tokens / (batch * seq))
  model = copy.deepcopy(config.model)
  if b.rope_theta:
    model.lm.rope_theta = float(b.rope_theta)
  if b.remat_policy:   # long rows: keep only layer inputs for the backward (activations per chip)
    model.lm.remat_policy = model.vision.remat_policy = b.remat_policy
  optim = ml_collections.ConfigDict(copy.deepcopy(o.to_dict()))
  lr = b.lr or o.lr
  optim.lr = float(lr)
  end = b.end_lr if b.end_lr >= 0 else lr * o.end_lr_ratio
  optim.end_lr_ratio = float(end / lr) if lr else 0.0
  if b.warmup_steps >= 0:
    optim.warmup_steps = int(b.warmup_steps)
  optim.warmup_steps = min(int(optim.warmup_steps), max(steps - 1, 0))
  if b.schedule:
    optim.schedule = b.schedule
  rate = b.router_bias_rate if b.router_bias_rate >= 0 else config.model.lm.router_bias_update_rate
  return Stage(name=name, index=STAGE_NAMES.index(name), block=b, task=b.task, steps=int(steps),
               global_batch=int(batch), microbatches=int(b.microbatches or t.microbatches),
               seq_len=int(seq),
               patches_per_row=int(b.max_patches_per_row or config.data.max_patches_per_row),
               model=model, optim=optim,
               trainable=tuple(b.trainable), router_bias_rate=float(rate))


def trainable_mask(params, patterns: Sequence[str]):
  """Pytree of bools: a leaf trains iff its '/'-joined path matches any pattern (() = all)."""
  import jax
  if not patterns:
    return jax.tree.map(lambda _: True, params)
  regs = [re.compile(p) for p in patterns]
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  keep = [any(r.search(_path(p)) for r in regs) for p, _ in flat]
  return jax.tree_util.tree_unflatten(treedef, keep)


def _path(key_path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in key_path)


def transfer_params(src, dst):
  """Copies every leaf of ``src`` whose path and shape exist in ``dst`` (load by parameter path).

  Returns (new_dst, copied_paths). Leaves of ``dst`` absent from ``src`` keep their (fresh)
  values: e.g. the LM when moving from ViT pretraining to alignment.
  """
  import jax
  src_flat = {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(src)[0]}
  copied = []

  def pick(p, x):
    key = _path(p)
    y = src_flat.get(key)
    if y is not None and tuple(y.shape) == tuple(x.shape):
      copied.append(key)
      return y.astype(x.dtype)
    return x

  return jax.tree_util.tree_map_with_path(pick, dst), copied


def _check_microbatches(config, name: str, num_devices: Optional[int]):
  """A stage's batch splits into its microbatches, and each microbatch over the data-parallel
  devices when their number is known: from the device count, or from a mesh with no -1 axis
  (as train.global_batch is checked in validate)."""
  b, t = config.stages[name], config.train
  batch = b.global_batch or t.global_batch
  micro = b.microbatches or t.microbatches
  field = f'config.stages.{name}.' + ('microbatches' if b.microbatches else 'global_batch')
  if batch % micro:
    raise ConfigError(f'{field}: {micro} microbatches do not divide the stage batch {batch}')
  axes = ('data', 'fsdp', 'expert')
  if num_devices is not None:
    resolved = resolve_mesh_shape(config.mesh, num_devices)
    sizes = [resolved[a] for a in axes]
  else:
    sizes = [config.mesh[a] for a in axes]
  if all(isinstance(n, int) and n > 0 for n in sizes) and (batch // micro) % math.prod(sizes):
    raise ConfigError(f'{field}: the stage batch {batch} in {micro} microbatches leaves '
                      f'{batch // micro} rows per microbatch, not divisible by the data-parallel '
                      f'size {math.prod(sizes)} (data*fsdp*expert)')


@register_check
def _check_stages(config, num_devices: Optional[int] = None):
  for name in STAGE_NAMES:
    b = config.stages[name]
    key = f'config.stages.{name}'
    if not b.enabled:
      continue
    if b.task not in TASKS:
      raise ConfigError(f'{key}.task: must be one of {", ".join(TASKS)}; got {b.task!r}')
    for k in ('steps', 'tokens', 'global_batch', 'microbatches', 'eval_every',
              'max_patches_per_row'):
      if not isinstance(b[k], int) or b[k] < 0:
        raise ConfigError(f'{key}.{k}: must be an integer >= 0, got {b[k]!r}')
    _check_microbatches(config, name, num_devices)
    if b.steps == 0 and b.tokens == 0:
      raise ConfigError(f'{key}: set a budget (steps or tokens > 0) or enabled=False')
    if b.max_patches_per_row % 4:
      raise ConfigError(f'{key}.max_patches_per_row: {b.max_patches_per_row} must be a multiple '
                        'of 4 (2x2 merge blocks)')
    if not isinstance(b.seq_len_scale, int) or b.seq_len_scale < 1:
      raise ConfigError(f'{key}.seq_len_scale: must be an integer >= 1, got {b.seq_len_scale!r}')
    seq = config.train.seq_len * b.seq_len_scale
    if seq > config.model.lm.max_position_embeddings and b.task != 'vit_pretrain':
      raise ConfigError(f'{key}.seq_len_scale: {seq} tokens exceed model.lm.max_position_embeddings '
                        f'{config.model.lm.max_position_embeddings}')
    if b.remat_policy not in ('', 'none', 'full', 'save_dots'):
      raise ConfigError(f'{key}.remat_policy: must be one of none, full, save_dots (or empty: '
                        f'the model\'s), got {b.remat_policy!r}')
    if b.loss_on not in ('all', 'assistant'):
      raise ConfigError(f'{key}.loss_on: must be all or assistant, got {b.loss_on!r}')
    if b.caption_text not in ('question_answer', 'answer'):
      raise ConfigError(f'{key}.caption_text: must be question_answer or answer, '
                        f'got {b.caption_text!r}')
    if b.task == 'vit_pretrain' and b.mixture:
      from kimi_vl_jax.train.data import parse_mixture, resolve_caption_source
      for source in parse_mixture(b.mixture):
        try:
          resolve_caption_source(config, name, source)
        except ValueError as e:
          raise ConfigError(f'config.{e}') from None
    for k in ('text_only_fraction', 'multimodal_share_start', 'multimodal_share_end', 'long_fraction'):
      if not 0.0 <= float(b[k]) <= 1.0:
        raise ConfigError(f'{key}.{k}: must be in [0, 1], got {b[k]!r}')
    if b.rope_theta < 0:
      raise ConfigError(f'{key}.rope_theta: must be >= 0 (0 = keep), got {b.rope_theta}')
    if b.lr < 0:
      raise ConfigError(f'{key}.lr: must be >= 0 (0 = optim.lr), got {b.lr}')
    if b.schedule not in ('', 'cosine', 'linear', 'constant'):
      raise ConfigError(f'{key}.schedule: must be cosine, linear or constant, got {b.schedule!r}')
    bad = [e for e in b.eval if e not in EVALS]
    if bad:
      raise ConfigError(f'{key}.eval: unknown {bad}; known: {", ".join(EVALS)}')
    for p in b.trainable:
      try:
        re.compile(p)
      except re.error as e:
        raise ConfigError(f'{key}.trainable: bad regex {p!r}: {e}') from None
    for s in b.image_sides:
      if not isinstance(s, int) or s < 28:
        raise ConfigError(f'{key}.image_sides: sides must be integers >= 28, got {s!r}')
    if b.mixture:
      for part in b.mixture.split(','):
        src, _, w = part.partition('=')
        try:
          ok = bool(src.strip()) and float(w) >= 0
        except ValueError:
          ok = False
        if not ok:
          raise ConfigError(f'{key}.mixture: expected "source=weight,...", bad part {part!r}')
