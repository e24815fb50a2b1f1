"""Config checks of the ``rl`` block and the 'rl' stage (one ConfigError line naming the key)."""
from __future__ import annotations

from typing import Optional

from kimi_vl_jax.config.validate import ConfigError, register_check

MODELS = ('kimi_vl', 'lm')
SAMPLING = ('uniform', 'curriculum', 'prioritized')


def _fail(key: str, msg: str):
  raise ConfigError(f'config.{key}: {msg}')


@register_check
def _check_rl(config, num_devices: Optional[int] = None):
  del num_devices
  if 'rl' not in config:
    return
  rl = config.rl
  if rl.model not in MODELS:
    _fail('rl.model', f'must be one of {", ".join(MODELS)}, got {rl.model!r}')
  if rl.sampling not in SAMPLING:
    _fail('rl.sampling', f'must be one of {", ".join(SAMPLING)}, got {rl.sampling!r}')
  for key, lo in (('samples_per_prompt', 2), ('max_response_tokens', 1),
                  ('updates_per_iteration', 1), ('problems_per_difficulty', 1),
                  ('length_penalty_warmup', 0)):
    v = rl[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
      why = ' (advantages are rewards minus the mean of k samples)' if key == 'samples_per_prompt' else ''
      _fail(f'rl.{key}', f'must be an integer >= {lo}, got {v!r}{why}')
  budget = rl.get('partial_rollout_tokens', 0)
  if not isinstance(budget, int) or isinstance(budget, bool) or not \
      0 <= budget < rl.max_response_tokens:
    _fail('rl.partial_rollout_tokens', f'must be an integer in [0, rl.max_response_tokens='
          f'{rl.max_response_tokens}) (0 = whole responses in one iteration), got {budget!r}')
  if not rl.tau > 0:
    _fail('rl.tau', f'must be > 0, got {rl.tau!r}')
  if not rl.temperature > 0:
    _fail('rl.temperature', f'must be > 0 (k samples at temperature 0 are identical), got '
          f'{rl.temperature!r}')
  if not 0 < rl.top_p <= 1:
    _fail('rl.top_p', f'must be in (0, 1], got {rl.top_p!r}')
  if rl.length_penalty_weight < 0:
    _fail('rl.length_penalty_weight', f'must be >= 0, got {rl.length_penalty_weight!r}')
  problems = rl.get('problems', '')
  if not isinstance(problems, str):
    _fail('rl.problems', f'must be a JSONL path, glob or comma-separated list, got {problems!r}')
  if problems.strip():
    _check_problems(config, problems)
  else:
    _check_generated(config)
  _check_stages(config, bool(problems.strip()))


def _check_problems(config, problems: str):
  """User problems replace the generated pool: rl.dataset/source/tasks are not read."""
  from kimi_vl_jax.data.sources.base import expand_paths
  rl = config.rl
  try:
    expand_paths(problems)
  except FileNotFoundError as e:
    _fail('rl.problems', f'{e} (a JSONL path, glob or comma-separated list of user problems)')
  if not rl.difficulties or any(isinstance(d, bool) or not isinstance(d, int)
                                for d in rl.difficulties):
    _fail('rl.difficulties', 'must be a non-empty tuple of integers (the problems\' "difficulty" '
          f'labels to keep), got {tuple(rl.difficulties)}')


def _check_generated(config):
  from kimi_vl_jax.data.generated import DATASETS, TASK_TO_DATASET
  rl = config.rl
  dataset = rl.dataset
  if rl.source:
    from kimi_vl_jax.data.mixture import generated_views
    try:
      views = generated_views(config.data.sources)
    except ValueError:
      views = {}                  # data.sources itself is reported by the data checks
    if rl.source not in views:
      _fail('rl.source', f'{rl.source!r} is not a generated entry of data.sources '
            f'({", ".join(views) or "none"})')
    dataset = views[rl.source][0]
  elif dataset not in DATASETS:
    _fail('rl.dataset', f'must be a generated dataset ({", ".join(DATASETS)}), got {dataset!r}')
  bad = [t for t in rl.tasks if TASK_TO_DATASET.get(t) != dataset]
  if not rl.tasks or bad:
    _fail('rl.tasks', f'{bad or "()"}: not tasks of the {dataset!r} dataset')
  if any(d not in (0, 1, 2) for d in rl.difficulties) or not rl.difficulties:
    _fail('rl.difficulties', f'must be a non-empty subset of (0, 1, 2), got {tuple(rl.difficulties)}')


def _check_stages(config, user_problems: bool):
  rl = config.rl
  for name in config.stages:
    b = config.stages[name]
    if not b.enabled or b.task != 'rl':
      continue
    batch = b.global_batch or config.train.global_batch
    if batch % rl.samples_per_prompt:
      _fail(f'stages.{name}.global_batch', f'{batch} rows are not a whole number of problems of '
            f'rl.samples_per_prompt={rl.samples_per_prompt} samples')
    if not b.steps:
      _fail(f'stages.{name}.steps', 'an rl stage is budgeted in iterations: set steps > 0')
    # A generated pool holds exactly problems_per_difficulty of each difficulty; a user pool
    # (rl.problems) at most that, its real size is checked when it is built
    # (ProblemPool.check_fits), as counting it here would parse every file.
    pool = rl.problems_per_difficulty * len(rl.difficulties)
    if batch // rl.samples_per_prompt > pool:
      _fail(f'stages.{name}.global_batch', f'{batch} rows need {batch // rl.samples_per_prompt} '
            f'distinct problems an iteration, but the pool holds '
            f'{"at most " if user_problems else ""}{pool} '
            '(rl.problems_per_difficulty x rl.difficulties)')
