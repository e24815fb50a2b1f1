"""Entry point: ``python -m kimi_vl_jax.main --config=experiments/x.py[:arg] --workdir=DIR``.

Dotted overrides follow the config flag: ``--config.train.steps=10``. Modes:
- ``describe``: abstract build, parameter counts and shardings (no allocation).
- ``train``: the experiment's curriculum (the default once the trainer exists).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment file (experiments/x.py[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and reports.')
_MODE = flags.DEFINE_enum('mode', 'describe', ['describe', 'train'], 'What to run.')


def run(argv) -> int:
  del argv
  # Multi-host set-up must precede any backend use.
  from kimi_vl_jax.parallel import distributed
  distributed.initialize()
  from kimi_vl_jax.config import ConfigError, validate

  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config=experiments/<name>.py is required')
  try:
    config.keys()  # config_flags defers load errors of the file until first use
  except OSError as e:
    reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
    print(f"error: --config: "
          f'cannot load the experiment file: {reason}', file=sys.stderr)
    return 2
  try:
    validate(config)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if _WORKDIR.value:
    os.makedirs(_WORKDIR.value, exist_ok=True)
  if _MODE.value == 'describe':
    from kimi_vl_jax.describe import describe
    describe(config)
    return 0
  from kimi_vl_jax.train import run_experiment  # the trainer issue provides this
  return run_experiment(config, _WORKDIR.value)


def parse_flags_or_exit(argv):
  """absl flag parsing whose config mistakes end in one line naming the flag, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # config_flags raises KeyError/AttributeError/IOError for bad files or keys
    message = str(e).strip().strip("'\"").replace('\\n', ' ').splitlines()
    cause = e.__cause__ or e.__context__
    detail = f' ({type(cause).__name__}: {cause})' if cause is not None and str(cause) not in str(e) else ''
    print(f'error: bad flag: {" ".join(message)}{detail}', file=sys.stderr)
    sys.exit(2)


def main():
  app.run(lambda argv: sys.exit(run(argv)), flags_parser=parse_flags_or_exit)


if __name__ == '__main__':
  main()
