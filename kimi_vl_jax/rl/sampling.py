"""Which problems an RL iteration trains on: uniform, curriculum (easy to hard) or prioritized.

``difficulty``: float array [N], one value per problem, larger = harder (a label such as a grade,
or ``1 - pass_rate`` of the SFT model over 10 samples). ``sample(n, iteration, total_iterations)``
returns ``n`` distinct int64 problem indices [n]; ``update(indices, correct)`` records verifier
outcomes. Unitless throughout.

Modes:
  uniform: ``n`` problems uniformly without replacement.
  curriculum: progress ``t = clip(iteration / total_iterations, 0, 1)`` ramps the eligible
    fraction ``t' = start + (1 - start) * t`` (``start = curriculum_start``, default 0.3). Problems
    are ranked by difficulty (stable sort, ties by index); those with rank
    ``< m = min(N, max(ceil(t' * N), n))`` are eligible, and ``n`` are drawn uniformly without
    replacement from them. So iteration 0 draws from the easiest 30% (at least ``n``), and
    ``iteration >= total_iterations`` from all.
  prioritized: each draw picks problem ``i`` with probability proportional to
    ``1 - success_rate_i`` among problems not yet drawn for this batch (exactly proportional for
    ``n == 1``). If fewer than ``n`` problems have non-zero weight, all of those are taken and the
    rest is filled uniformly from the others; if every problem has success rate 1, it is uniform.

``success_rate_i`` is the running mean of all recorded attempts of problem ``i`` (0 for a problem
never attempted, so unseen problems get full priority). Draws are deterministic given
``(seed, iteration)`` and, for ``prioritized``, the recorded success rates, which
``get_state`` / ``set_state`` carry through a checkpoint as JSON lists.
"""
from __future__ import annotations

import math

import numpy as np

MODES = ('uniform', 'curriculum', 'prioritized')


class ProblemSampler:
  """Samples problem indices for RL iterations and tracks per-problem success rates.

  Args:
    difficulty: [N] per-problem difficulty (larger = harder); only ``curriculum`` reads values.
    mode: one of ``'uniform'``, ``'curriculum'``, ``'prioritized'``.
    seed: base seed; iteration ``i`` uses ``np.random.default_rng([seed, i])``.
    curriculum_start: eligible fraction at progress 0, in (0, 1].
  """

  def __init__(self, difficulty: np.ndarray, mode: str = 'uniform', seed: int = 0,
               curriculum_start: float = 0.3):
    difficulty = np.asarray(difficulty, dtype=np.float64)
    if difficulty.ndim != 1 or difficulty.shape[0] == 0:
      raise ValueError(f'difficulty: expected a non-empty 1-D array [N], got shape '
                       f'{difficulty.shape}')
    if mode not in MODES:
      raise ValueError(f'mode: expected one of {MODES}, got {mode!r}')
    if not 0.0 < curriculum_start <= 1.0:
      raise ValueError(f'curriculum_start: expected a fraction in (0, 1], got {curriculum_start}')
    self.difficulty = difficulty
    self.mode = mode
    self.seed = int(seed)
    self.curriculum_start = float(curriculum_start)
    self.num_problems = difficulty.shape[0]
    # rank_order[r] = index of the r-th easiest problem.
    self.rank_order = np.argsort(difficulty, kind='stable')
    self.attempts = np.zeros(self.num_problems, np.int64)
    self.successes = np.zeros(self.num_problems, np.float64)

  @property
  def success_rate(self) -> np.ndarray:
    """[N] running mean of recorded outcomes; 0 where a problem has no attempts."""
    return np.where(self.attempts > 0, self.successes / np.maximum(self.attempts, 1), 0.0)

  def num_eligible(self, n: int, iteration: int, total_iterations: int) -> int:
    """Curriculum pool size ``m = min(N, max(ceil(t' * N), n))`` at this iteration."""
    t = min(max(iteration / total_iterations, 0.0), 1.0)
    frac = self.curriculum_start + (1.0 - self.curriculum_start) * t
    # round() first so that e.g. 0.3 * 10 = 3.0000000000000004 counts as 3, not 4.
    return min(self.num_problems, max(math.ceil(round(frac * self.num_problems, 9)), n))

  def sample(self, n: int, iteration: int, total_iterations: int) -> np.ndarray:
    """``n`` distinct problem indices (int64 [n]) for ``iteration`` of ``total_iterations``."""
    if n <= 0:
      raise ValueError(f'n: expected a positive number of problems, got {n}')
    if n > self.num_problems:
      raise ValueError(f'n: {n} problems requested but only {self.num_problems} exist')
    if total_iterations <= 0:
      raise ValueError(f'total_iterations: expected > 0, got {total_iterations}')
    if iteration < 0:
      raise ValueError(f'iteration: expected >= 0, got {iteration}')
    rng = np.random.default_rng([self.seed, int(iteration)])
    if self.mode == 'uniform':
      out = rng.choice(self.num_problems, size=n, replace=False)
    elif self.mode == 'curriculum':
      m = self.num_eligible(n, iteration, total_iterations)
      out = rng.choice(self.rank_order[:m], size=n, replace=False)
    else:
      out = self._prioritized(rng, n)
    return np.asarray(out, np.int64)

  def _prioritized(self, rng: np.random.Generator, n: int) -> np.ndarray:
    weight = np.clip(1.0 - self.success_rate, 0.0, 1.0)
    live = np.flatnonzero(weight > 0)
    if live.size == 0:
      return rng.choice(self.num_problems, size=n, replace=False)
    take = min(n, live.size)
    picked = rng.choice(live, size=take, replace=False, p=weight[live] / weight[live].sum())
    if take == n:
      return picked
    rest = np.setdiff1d(np.arange(self.num_problems), live)
    return np.concatenate([picked, rng.choice(rest, size=n - take, replace=False)])

  def update(self, indices: np.ndarray, correct: np.ndarray) -> None:
    """Records outcomes: ``correct`` [n] or [n, k] in [0, 1] for ``indices`` [n].

    Every entry is one attempt (a [n, k] array adds k attempts per problem); repeated indices
    each count.
    """
    indices = np.asarray(indices)
    correct = np.asarray(correct, np.float64)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
      raise ValueError(f'indices: expected a 1-D integer array, got {indices.dtype} '
                       f'{indices.shape}')
    if indices.size and (indices.min() < 0 or indices.max() >= self.num_problems):
      raise ValueError(f'indices: values must lie in [0, {self.num_problems})')
    if correct.ndim not in (1, 2) or correct.shape[0] != indices.shape[0]:
      raise ValueError(f'correct: expected shape [{indices.shape[0]}] or '
                       f'[{indices.shape[0]}, k], got {correct.shape}')
    correct_nk = correct.reshape(indices.shape[0], -1)
    np.add.at(self.attempts, indices, correct_nk.shape[1])
    np.add.at(self.successes, indices, correct_nk.sum(axis=1))

  def get_state(self) -> dict:
    """JSON-able record of the outcomes: ``{'attempts': [N] ints, 'successes': [N] floats}``."""
    return {'attempts': self.attempts.tolist(), 'successes': self.successes.tolist()}

  def set_state(self, state: dict) -> None:
    """Restores ``get_state()``'s record; an empty dict means no outcomes recorded yet."""
    if not state:
      self.attempts[:] = 0
      self.successes[:] = 0.0
      return
    attempts = np.asarray(state['attempts'], np.int64)
    successes = np.asarray(state['successes'], np.float64)
    if attempts.shape != (self.num_problems,) or successes.shape != (self.num_problems,):
      raise ValueError(f'state: expected attempts and successes of shape ({self.num_problems},), '
                       f'got {attempts.shape} and {successes.shape}')
    self.attempts = attempts.copy()
    self.successes = successes.copy()
