"""Entry point: ``python -m kimi_vl_jax.main --config=experiments/x.py[:arg] --workdir=DIR``.

Dotted overrides follow the config flag: ``--config.train.steps=10``. Modes:
- ``describe``: abstract build, parameter counts and shardings (no allocation).
- ``train``: the experiment's curriculum (the default once the trainer exists).
- ``aot``: compile each stage's train step for a TPU topology (``--topology=v5p:4x4x2``) on
  this host and report per-chip memory, or that it does not fit (``train/aot.py``; needs
  libtpu: ``pip install -e '.[aot]'``).
"""
from __future__ import annotations

import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment file (experiments/x.py[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and reports.')
_MODE = flags.DEFINE_enum('mode', 'describe', ['describe', 'train', 'aot'], 'What to run.')
_STAGES = flags.DEFINE_list('stages', None, 'Train (or compile) only these stages '
                            '(config.stages.<name>), in curriculum order; default: every enabled '
                            'stage.')
_TOPOLOGY = flags.DEFINE_string('topology', None, '--mode=aot: the TPU topology to compile for, '
                                'e.g. v5p:4x4x2 (32 chips).')
_CHIPS_PER_HOST = flags.DEFINE_string('chips_per_host', '2x2x1', '--mode=aot: chips per host.')


def run(argv) -> int:
  del argv
  # Multi-host set-up must precede any backend use.
  from kimi_vl_jax.parallel import distributed
  distributed.initialize()
  # Before the first computation: CPU programs run inline and reuse their memory (cpu_runtime).
  from kimi_vl_jax import cpu_runtime
  runtime = cpu_runtime.setup()
  from kimi_vl_jax.config import ConfigError, validate
  import kimi_vl_jax.train  # noqa: F401  (registers the stage checks with validate)

  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config=experiments/<name>.py is required')
  try:
    config.keys()  # config_flags defers load errors of the file until first use
  except OSError as e:
    reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
    print(f'error: --config={config_flags.get_config_filename(flags.FLAGS["config"])}: '
          f'cannot load the experiment file: {reason}', file=sys.stderr)
    return 2
  import jax
  num_devices = jax.device_count() if _MODE.value == 'train' else None
  if _MODE.value == 'aot':
    if not _TOPOLOGY.value:
      raise app.UsageError('--mode=aot needs --topology, e.g. --topology=v5p:4x4x2')
    from kimi_vl_jax.train import aot
    try:
      devices = aot.topology_devices(_TOPOLOGY.value, _CHIPS_PER_HOST.value)
    except (RuntimeError, ValueError) as e:
      print(f'error: --topology={_TOPOLOGY.value}: {e}', file=sys.stderr)
      return 2
    num_devices = len(devices)
  try:
    # Training (and aot) check the mesh and batch against the devices; describe may
    # describe a pod mesh from a laptop, so it checks only what the config itself fixes.
    validate(config, num_devices=num_devices)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  from absl import logging
  logging.info('cpu runtime: %s', runtime)   # after validation: a config error stays one line
  if _WORKDIR.value:
    os.makedirs(_WORKDIR.value, exist_ok=True)
  if _MODE.value == 'describe':
    from kimi_vl_jax.describe import describe
    # Every process builds the same description; one copy in the logs is enough.
    describe(config, print_fn=print if jax.process_index() == 0 else lambda *_: None)
    return 0
  if _MODE.value == 'aot':
    results = aot.compile_stages(config, _TOPOLOGY.value, _STAGES.value, _CHIPS_PER_HOST.value)
    if _WORKDIR.value:
      import json
      with open(os.path.join(_WORKDIR.value, 'aot.json'), 'w') as f:
        json.dump({'topology': _TOPOLOGY.value, 'stages': results}, f, indent=1)
    return 0 if all(r['fits'] for r in results) else 1
  from kimi_vl_jax.train import run_experiment  # the trainer issue provides this
  try:
    return run_experiment(config, _WORKDIR.value, _STAGES.value)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2


def flag_error_line(error: BaseException, argv) -> str:
  """One line for a flag/config-file mistake: the offending argument, then the reason.

  config_flags reports mistakes in many shapes (a KeyError with a suggestion for an
  unknown override key, a ValueError wrapping a whole traceback for a failing
  ``get_config``, SyntaxError/ImportError for a broken experiment file); all become
  ``error: --config.train.stepz=3: unknown key 'stepz' ...`` style lines.
  """
  if error.args and isinstance(error.args[0], KeyError):
    error = error.args[0]  # config_flags wraps an unknown override key in an AttributeError
  culprit = _culprit_flag(f'{error} {error.__context__}', [a for a in argv[1:] if a.startswith('--')])
  if isinstance(error, KeyError) and error.args and culprit.startswith('--config.'):
    reason = 'unknown key ' + ' '.join(line.strip() for line in str(error.args[0]).splitlines())
  elif isinstance(error, SyntaxError) and error.lineno:
    reason = f'SyntaxError: {error.msg} ({error.filename}, line {error.lineno})'
  else:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[-1] if lines else ''
    reason = re.sub(r'^flag --\S+: ', '', reason)  # absl repeats the flag; the line starts with it
    # A wrapped traceback ends in 'ValueError: msg'; other errors get their type name.
    if not re.match(r'^[A-Za-z_.]*(Error|Exception): ', reason) and not isinstance(
        error, flags.Error):
      reason = f'{type(error).__name__}: {reason}'
  return f'error: {culprit}: {reason}' if culprit else f'error: bad flag: {reason}'


def _culprit_flag(text: str, args) -> str:
  """The argument a message is about: an override naming the bad key, a named flag, the file."""
  overrides = [a for a in args if a.startswith('--config.')]
  for arg in overrides:
    path = arg.split('=', 1)[0][len('--config.'):].split('.')
    if any(f"'{part}'" in text for part in path):
      return arg
  for arg in args:
    name = arg.split('=', 1)[0]
    if not arg.startswith('--config=') and (name in text or f"'{name[2:]}'" in text):
      return arg
  files = [a for a in args if a.startswith('--config=')]
  return files[0] if files else ''


def parse_flags_or_exit(argv):
  """absl flag parsing whose config mistakes end in one line naming the flag, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # config_flags raises KeyError/ValueError/SyntaxError/... for bad files or keys
    print(flag_error_line(e, argv), file=sys.stderr)
    sys.exit(2)


def main():
  app.run(lambda argv: sys.exit(run(argv)), flags_parser=parse_flags_or_exit)


if __name__ == '__main__':
  main()
