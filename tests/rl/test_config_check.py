"""The rl block and the rl stage: each mistake is one ConfigError naming the key."""
import pytest

from kimi_vl_jax.config import ConfigError, base_config, validate


def _config(**rl):
  c = base_config('tiny')
  for name in c.stages:
    c.stages[name].enabled = name == 'rl'
  c.stages.rl.steps = 2
  c.rl.update(rl)
  return c


@pytest.mark.parametrize('rl,key,reason', [
    (dict(model='vit'), 'rl.model', 'kimi_vl, lm'),
    (dict(sampling='hardest'), 'rl.sampling', 'uniform, curriculum, prioritized'),
    (dict(samples_per_prompt=1), 'rl.samples_per_prompt', 'mean of k samples'),
    (dict(tau=0.0), 'rl.tau', '> 0'),
    (dict(temperature=0.0), 'rl.temperature', 'identical'),
    (dict(top_p=1.5), 'rl.top_p', '(0, 1]'),
    (dict(dataset='imagenet'), 'rl.dataset', 'generated dataset'),
    (dict(tasks=('count',)), 'rl.tasks', "not tasks of the 'math' dataset"),
    (dict(difficulties=(3,)), 'rl.difficulties', 'subset of (0, 1, 2)'),
    (dict(source='nowhere'), 'rl.source', 'not a generated entry of data.sources'),
    (dict(source='shapes'), 'rl.tasks', "not tasks of the 'shapes' dataset"),
    (dict(problems_per_difficulty=2), 'stages.rl.global_batch', 'the pool holds 6'),
    (dict(samples_per_prompt=5), 'stages.rl.global_batch', 'rl.samples_per_prompt=5'),
])
def test_rl_mistakes_name_the_key(rl, key, reason):
  with pytest.raises(ConfigError) as info:
    validate(_config(**rl), num_devices=8)
  assert str(info.value).startswith(f'config.{key}:') and reason in str(info.value), str(info.value)


def test_rl_stage_needs_iterations():
  c = _config()
  c.stages.rl.steps = 0
  with pytest.raises(ConfigError, match=r'^config\.stages\.rl'):
    validate(c, num_devices=8)


def test_valid_rl_config_passes():
  validate(_config(), num_devices=8)
