"""The trainer: stages of the Kimi-VL recipe, train step, losses, checkpoints, evaluation.

``run_experiment(config, workdir, stages=None) -> int`` runs the curriculum (``loop.py``);
importing this package registers the stage checks with ``config.validate``.
"""
from kimi_vl_jax.train import stages as _stages  # noqa: F401  (registers validate checks)


def run_experiment(config, workdir, stages=None) -> int:
  """Runs the enabled (or ``stages``-selected) stages of ``config`` in ``workdir``; 0 on success."""
  from kimi_vl_jax.train.loop import run_experiment as _run
  return _run(config, workdir, stages)
