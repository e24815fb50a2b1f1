"""Learning-rate schedules from ``config.optim``: linear warmup, then cosine, linear or constant.

``make_schedule(optim_cfg, total_steps)`` returns an optax schedule ``step -> lr``. Step 0
is the first update; warmup rises linearly from 0 so that step ``warmup_steps`` has the peak
``lr``. The decay phase runs from ``warmup_steps`` to ``decay_steps`` (counted from step 0,
warmup included) and ends at ``lr * end_lr_ratio`` (Moonlight: 4.2e-4 -> 4.2e-5, SPEC §4.1).

One formula, ``lr_at(step, params)``, over the numbers of ``schedule_params(optim_cfg,
total_steps)``: a train step that takes those numbers as an argument compiles to the same
program for every stage whose schedules differ only in numbers (kind included), so the
persistent compilation cache serves them all; ``make_schedule`` binds them as constants.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax.numpy as jnp
import numpy as np
import optax

SCHEDULES = ('cosine', 'linear', 'constant')


def decay_steps_of(optim_cfg, total_steps: Optional[int]) -> int:
  """The decay horizon: ``optim.decay_steps`` if set (> 0), else ``total_steps``."""
  steps = int(optim_cfg.get('decay_steps', 0) or 0)
  if steps > 0:
    return steps
  if total_steps is None or total_steps <= 0:
    raise ValueError(
        f'config.optim.schedule={optim_cfg.schedule!r} decays over a horizon: set '
        'config.optim.decay_steps > 0 or pass total_steps (e.g. config.train.steps) to '
        'build_optimizer / make_schedule')
  return int(total_steps)


def schedule_params(optim_cfg, total_steps: Optional[int] = None) -> dict:
  """The schedule of ``optim_cfg`` as float32 scalars for ``lr_at``: peak and end lr, warmup
  steps, decay span (steps after warmup) and the kind as 0/1 flags."""
  name = optim_cfg.schedule
  if name not in SCHEDULES:
    raise ValueError(f'config.optim.schedule: must be one of {", ".join(SCHEDULES)}; got {name!r}')
  peak = float(optim_cfg.lr)
  warmup = int(optim_cfg.warmup_steps)
  if warmup < 0:
    raise ValueError(f'config.optim.warmup_steps: must be >= 0, got {warmup}')
  end = peak * float(optim_cfg.end_lr_ratio)
  span = 1 if name == 'constant' else max(decay_steps_of(optim_cfg, total_steps) - warmup, 1)
  f32 = np.float32
  return {'peak': f32(peak), 'end': f32(end), 'warmup': f32(warmup), 'span': f32(span),
          'cosine': f32(name == 'cosine'), 'constant': f32(name == 'constant')}


def lr_at(step, params: dict):
  """The lr at ``step`` (int or int array) of a ``schedule_params`` schedule: linear warmup
  from 0, then cosine (``end + (peak - end) (1 + cos(pi f)) / 2``), linear or constant over the
  decay progress ``f`` in [0, 1]."""
  p = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  t = jnp.asarray(step, jnp.float32)
  warm = p['peak'] * t / jnp.maximum(p['warmup'], 1.0)
  frac = jnp.clip((t - p['warmup']) / p['span'], 0.0, 1.0)
  shape = jnp.where(p['cosine'] > 0, 0.5 * (1.0 + jnp.cos(jnp.pi * frac)), 1.0 - frac)
  decay = p['end'] + (p['peak'] - p['end']) * shape
  decay = jnp.where(p['constant'] > 0, p['peak'], decay)
  return jnp.where(t < p['warmup'], warm, decay)


def make_schedule(optim_cfg, total_steps: Optional[int] = None) -> optax.Schedule:
  """Warmup + {cosine, linear, constant} schedule for ``optim_cfg`` (a config.optim block), with
  its numbers compiled in."""
  return functools.partial(lr_at, params=schedule_params(optim_cfg, total_steps))
