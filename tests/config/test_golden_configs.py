"""Golden snapshots of every experiment's resolved config.

Every ``experiments/*.py`` (found automatically) is resolved with ``get_config()`` and with
each ``:arg`` in its module-level ``ARGS`` tuple, validated, and compared key by key with
``tests/config/golden/<name>.json`` (``<name>@<arg>.json`` for an arg). A change to a
preset, the schema or an experiment shows up here as a reviewed diff.

Accept intended changes (and create snapshots for new experiments) with:

    KVJ_REGEN_GOLDEN=1 python -m pytest -q tests/config/test_golden_configs.py
"""
import glob
import importlib.util
import json
import os

import pytest

from kimi_vl_jax.config import validate

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN_DIR = os.path.join(HERE, 'golden')
EXPERIMENTS_DIR = os.path.join(os.path.dirname(os.path.dirname(HERE)), 'experiments')
REGEN = os.environ.get('KVJ_REGEN_GOLDEN') == '1'
REGEN_HINT = 'KVJ_REGEN_GOLDEN=1 python -m pytest -q tests/config/test_golden_configs.py'


def _load(path):
  name = 'experiment_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _variants():
  """(experiment file stem, arg or None) for every experiment file and its ARGS."""
  out = []
  for path in sorted(glob.glob(os.path.join(EXPERIMENTS_DIR, '*.py'))):
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem.startswith('_'):
      continue
    args = getattr(_load(path), 'ARGS', ())
    out.append((stem, None))
    out.extend((stem, str(a)) for a in args)
  return out


def _golden_name(stem, arg):
  return f'{stem}.json' if arg is None else f'{stem}@{arg}.json'


def resolve(stem, arg):
  """The experiment's config as plain JSON-able data (tuples become lists)."""
  module = _load(os.path.join(EXPERIMENTS_DIR, f'{stem}.py'))
  config = module.get_config(arg) if arg is not None else module.get_config()
  validate(config)
  return json.loads(json.dumps(config.to_dict(), sort_keys=True))


def _flatten(tree, prefix=''):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f'{prefix}.{k}' if prefix else k))
    return out
  return {prefix: tree}


def diff(expected, actual) -> list[str]:
  """Human-readable key-by-key differences between two resolved configs."""
  e, a = _flatten(expected), _flatten(actual)
  lines = [f'  {k}: {e[k]!r} -> {a[k]!r}' for k in sorted(e.keys() & a.keys()) if e[k] != a[k]]
  lines += [f'  {k}: removed (was {e[k]!r})' for k in sorted(e.keys() - a.keys())]
  lines += [f'  {k}: added {a[k]!r}' for k in sorted(a.keys() - e.keys())]
  return lines


VARIANTS = _variants()


def test_every_experiment_is_discovered():
  stems = {s for s, _ in VARIANTS}
  assert {'demo', 'kimi_vl_a3b'} <= stems
  assert ('kimi_vl_a3b', 'v5p-64') in VARIANTS


@pytest.mark.parametrize('stem,arg', VARIANTS, ids=[_golden_name(s, a)[:-5] for s, a in VARIANTS])
def test_resolved_config_matches_golden(stem, arg):
  actual = resolve(stem, arg)
  path = os.path.join(GOLDEN_DIR, _golden_name(stem, arg))
  if REGEN:
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
      json.dump(actual, f, indent=2, sort_keys=True)
      f.write('\n')
    return
  if not os.path.exists(path):
    pytest.fail(f'no golden snapshot for experiments/{stem}.py'
                f'{":" + arg if arg else ""} ({os.path.relpath(path)}); create it with: {REGEN_HINT}')
  with open(path, encoding='utf-8') as f:
    expected = json.load(f)
  changes = diff(expected, actual)
  assert not changes, (f'experiments/{stem}.py{":" + arg if arg else ""} resolves differently '
                       f'from {os.path.relpath(path)}:\n' + '\n'.join(changes) +
                       f'\nIf intended, accept with: {REGEN_HINT}')


def test_no_orphaned_snapshots():
  expected = {_golden_name(s, a) for s, a in VARIANTS}
  present = {os.path.basename(p) for p in glob.glob(os.path.join(GOLDEN_DIR, '*.json'))}
  orphans = sorted(present - expected)
  if REGEN:
    for name in orphans:
      os.remove(os.path.join(GOLDEN_DIR, name))
    return
  assert not orphans, (f'golden snapshots without an experiment: {orphans}; delete them or run '
                       f'{REGEN_HINT}')


def test_diff_reports_changed_added_and_removed_keys():
  before = {'train': {'steps': 10, 'seq_len': 256}, 'name': 'x'}
  after = {'train': {'steps': 20}, 'name': 'x', 'mesh': {'data': -1}}
  assert diff(before, after) == ['  train.steps: 10 -> 20', '  train.seq_len: removed (was 256)',
                                 '  mesh.data: added -1']
