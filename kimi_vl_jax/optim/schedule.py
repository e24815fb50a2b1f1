"""Learning-rate schedules from ``config.optim``: linear warmup, then cosine, linear or constant.

``make_schedule(optim_cfg, total_steps)`` returns an optax schedule ``step -> lr``. Step 0
is the first update; warmup rises linearly from 0 so that step ``warmup_steps`` has the peak
``lr``. The decay phase runs from ``warmup_steps`` to ``decay_steps`` (counted from step 0,
warmup included) and ends at ``lr * end_lr_ratio`` (Moonlight: 4.2e-4 -> 4.2e-5, SPEC §4.1).
"""
from __future__ import annotations

from typing import Optional

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


def make_schedule(optim_cfg, total_steps: Optional[int] = None) -> optax.Schedule:
  """Warmup + {cosine, linear, constant} schedule for ``optim_cfg`` (a config.optim block)."""
  name = optim_cfg.schedule
  if name not in SCHEDULES:
    raise ValueError(f'config.optim.schedule: must be one of {", ".join(SCHEDULES)}; got {name!r}')
  peak = float(optim_cfg.lr)
  warmup = int(optim_cfg.warmup_steps)
  if warmup < 0:
    raise ValueError(f'config.optim.warmup_steps: must be >= 0, got {warmup}')
  end = peak * float(optim_cfg.end_lr_ratio)
  if name == 'constant':
    decay = optax.constant_schedule(peak)
  else:
    horizon = decay_steps_of(optim_cfg, total_steps)
    span = max(horizon - warmup, 1)
    if name == 'cosine':
      decay = optax.cosine_decay_schedule(peak, span, alpha=end / peak if peak else 0.0)
    else:
      decay = optax.linear_schedule(peak, end, span)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])
