"""Which record is stream example i: a pure function of (seed, process, i), epochs without repeats.

The stream is cut into blocks of ``block`` examples. Block b takes its source counts from the
mixture weights at its first example's step, rounded by systematic sampling (a seeded offset;
counts sum to ``block`` and are unbiased, so tiny weights still get drawn), and lays them out in
a seeded random order. Example i of source k is that source's c-th draw, where c counts its
draws before i (prefix sums over blocks, cached). Draw c reads record
``prp_{seed, process, k, epoch}(c mod N_k)`` with epoch = c div N_k: every record once per epoch,
in a fresh order each epoch (``feistel_permutation``, O(1) memory, like levanter's PRP). So
resuming needs only the index, and any process can compute any example without reading others.
"""
from __future__ import annotations

import threading
from typing import Sequence

import numpy as np

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
  """splitmix64 finalizer: a well-mixed 64-bit hash of x."""
  x = (x + 0x9E3779B97F4A7C15) & _MASK64
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
  return x ^ (x >> 31)


def feistel_permutation(i: int, n: int, key: int, rounds: int = 4) -> int:
  """A keyed pseudo-random permutation of [0, n): 4 Feistel rounds + cycle walking."""
  if not 0 <= i < n:
    raise IndexError(f'{i} outside [0, {n})')
  if n == 1:
    return 0
  half = max(1, ((n - 1).bit_length() + 1) // 2)
  mask = (1 << half) - 1
  x = i
  while True:          # the Feistel domain is < 4n, so this loops < 4 times on average
    left, right = x >> half, x & mask
    for r in range(rounds):
      left, right = right, left ^ (_mix64(right ^ _mix64(key + r)) & mask)
    x = (left << half) | right
    if x < n:
      return x


class StreamPlan:
  """``locate(i) -> (source k, record j)`` for one process's stream (see module docstring)."""

  def __init__(self, weights_at_step, sizes: Sequence[int], seed: int, process: int,
               examples_per_step: int, block: int = 64):
    self.weights_at_step, self.sizes = weights_at_step, np.asarray(sizes, np.int64)
    self.seed, self.process, self.block = int(seed), int(process), int(block)
    self.examples_per_step = max(1, int(examples_per_step))
    self._prefix = [np.zeros(len(sizes), np.int64)]     # draws per source before block b
    self._cache: dict[int, np.ndarray] = {}
    # grain's read threads call locate() concurrently; the lazily grown caches need a lock
    # (two threads extending _prefix at once appended a block twice and shifted every later
    # example onto another record).
    self._lock = threading.RLock()

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_prefix'], state['_cache'] = [np.zeros(len(self.sizes), np.int64)], {}
    del state['_lock']
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.RLock()

  def block_sources(self, b: int) -> np.ndarray:
    """[block] source ids of block b (seeded order)."""
    with self._lock:
      return self._block_sources(b)

  def _block_sources(self, b: int) -> np.ndarray:
    if b in self._cache:
      return self._cache[b]
    w = np.asarray(self.weights_at_step((b * self.block) // self.examples_per_step), np.float64)
    w = np.where(self.sizes > 0, w, 0.0)
    if w.sum() <= 0:
      raise ValueError(f'process {self.process}: every source with weight is empty '
                       f'(shard sizes {self.sizes.tolist()})')
    rng = np.random.default_rng([self.seed, self.process, b, 0x5EED])
    edges = np.floor(np.cumsum(w / w.sum()) * self.block + rng.random())
    counts = np.diff(np.concatenate([[0.0], edges])).astype(np.int64)
    counts[-1] += self.block - counts.sum()        # float round-off: keep the block exact
    sources = rng.permutation(np.repeat(np.arange(len(w)), counts))
    if len(self._cache) > 8:
      self._cache.pop(next(iter(self._cache)))
    self._cache[b] = sources
    return sources

  def _prefix_at(self, b: int) -> np.ndarray:
    """Draws per source before block b (call with the lock held)."""
    while len(self._prefix) <= b:
      k = len(self._prefix) - 1
      self._prefix.append(self._prefix[k] + np.bincount(self._block_sources(k),
                                                         minlength=len(self.sizes)))
    return self._prefix[b]

  def locate(self, i: int) -> tuple[int, int]:
    b, r = divmod(int(i), self.block)
    with self._lock:
      sources = self._block_sources(b)
      prefix = self._prefix_at(b)
    k = int(sources[r])
    c = int(prefix[k]) + int(np.count_nonzero(sources[:r] == k))
    epoch, pos = divmod(c, int(self.sizes[k]))
    key = _mix64((self.seed << 40) ^ (self.process << 24) ^ (k << 12) ^ _mix64(epoch))
    return k, feistel_permutation(pos, int(self.sizes[k]), key)
