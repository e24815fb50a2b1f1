"""Schedules: the data form (schedule_params + lr_at) equals the optax form (make_schedule)."""
import numpy as np
import pytest

from kimi_vl_jax.config import base_config
from kimi_vl_jax.optim.schedule import lr_at, make_schedule, schedule_params


@pytest.mark.parametrize('name', ['cosine', 'linear', 'constant'])
@pytest.mark.parametrize('warmup', [0, 3])
def test_lr_at_matches_make_schedule(name, warmup):
  cfg = base_config('tiny').optim
  cfg.update(dict(schedule=name, lr=2e-3, warmup_steps=warmup, end_lr_ratio=0.1))
  steps = np.arange(25)
  want = np.array([float(make_schedule(cfg, 20)(int(i))) for i in steps])
  got = np.asarray(lr_at(steps, schedule_params(cfg, 20)))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
  assert got[-1] == pytest.approx(2e-3 if name == 'constant' else 2e-4, rel=1e-6)


def test_schedule_params_validates_like_make_schedule():
  cfg = base_config('tiny').optim
  with pytest.raises(ValueError, match='decay_steps'):
    schedule_params(cfg, None)
  cfg.schedule = 'step'
  with pytest.raises(ValueError, match='config.optim.schedule'):
    schedule_params(cfg, 10)
