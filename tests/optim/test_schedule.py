"""Schedules: ``lr_at`` / ``make_schedule`` against the same schedules built from optax's pieces."""
import numpy as np
import optax
import pytest

from kimi_vl_jax.config import base_config
from kimi_vl_jax.optim.schedule import lr_at, make_schedule, schedule_params


def _optax_reference(name, peak, end, warmup, horizon):
  span = max(horizon - warmup, 1)
  decay = {'cosine': optax.cosine_decay_schedule(peak, span, alpha=end / peak),
           'linear': optax.linear_schedule(peak, end, span),
           'constant': optax.constant_schedule(peak)}[name]
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


@pytest.mark.parametrize('name', ['cosine', 'linear', 'constant'])
@pytest.mark.parametrize('warmup', [0, 3])
def test_lr_at_matches_optax(name, warmup):
  cfg = base_config('tiny').optim
  cfg.update(dict(schedule=name, lr=2e-3, warmup_steps=warmup, end_lr_ratio=0.1))
  steps = np.arange(25)
  ref = _optax_reference(name, 2e-3, 2e-4, warmup, 20)
  want = np.array([float(ref(int(i))) for i in steps])
  got = np.asarray(lr_at(steps, schedule_params(cfg, 20)))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose([float(make_schedule(cfg, 20)(int(i))) for i in steps], want,
                             rtol=1e-6, atol=1e-12)
  assert got[-1] == pytest.approx(2e-3 if name == 'constant' else 2e-4, rel=1e-6)


def test_schedule_mistakes_name_the_field():
  cfg = base_config('tiny').optim
  with pytest.raises(ValueError, match='decay_steps'):
    schedule_params(cfg, None)
  cfg.warmup_steps = -1
  with pytest.raises(ValueError, match='config.optim.warmup_steps'):
    make_schedule(cfg, 10)
  cfg.warmup_steps, cfg.schedule = 0, 'step'
  with pytest.raises(ValueError, match='config.optim.schedule'):
    make_schedule(cfg, 10)
