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
    (dict(partial_rollout_tokens=64), 'rl.partial_rollout_tokens', '[0, rl.max_response_tokens=64)'),
    (dict(partial_rollout_tokens=-1), 'rl.partial_rollout_tokens', 'got -1'),
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


def _problems_file(tmp_path):
  path = tmp_path / 'problems.jsonl'
  path.write_text('{"messages": [{"role": "user", "content": "2 + 2?"}], "answer": "4"}\n')
  return str(path)


def test_rl_problems_must_match_a_file(tmp_path):
  c = _config(problems=str(tmp_path / 'missing' / '*.jsonl'))
  with pytest.raises(ConfigError) as info:
    validate(c, num_devices=8)
  msg = str(info.value)
  assert msg.startswith('config.rl.problems: no files match') and 'missing' in msg, msg


def test_rl_problems_replace_the_generated_settings(tmp_path):
  """With rl.problems, the generated pool's keys are not read and difficulties are any labels;
  the pool-size check can only use its upper bound (the real size is checked at build)."""
  path = _problems_file(tmp_path)
  validate(_config(problems=path, dataset='imagenet', source='nowhere', tasks=('count',),
                   difficulties=(0, 7)), num_devices=8)
  validate(_config(problems=f'{tmp_path}/*.jsonl,{path}'), num_devices=8)
  with pytest.raises(ConfigError, match=r'^config\.rl\.difficulties: must be a non-empty tuple'):
    validate(_config(problems=path, difficulties=()), num_devices=8)
  with pytest.raises(ConfigError, match=r'^config\.stages\.rl\.global_batch: .*the pool holds at '
                     r'most 2 \(rl\.problems_per_difficulty x rl\.difficulties\)'):
    validate(_config(problems=path, difficulties=(0, 1), problems_per_difficulty=1),
             num_devices=8)
