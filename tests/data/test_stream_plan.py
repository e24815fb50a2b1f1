"""The stream plan: permutations, epochs without repeats, exact block counts, purity."""
import pickle

import numpy as np
import pytest

from kimi_vl_jax.data.stream_plan import StreamPlan, feistel_permutation


@pytest.mark.parametrize('n', [1, 2, 3, 5, 16, 17, 1000])
def test_feistel_is_a_permutation(n):
  perm = [feistel_permutation(i, n, key=42) for i in range(n)]
  assert sorted(perm) == list(range(n))
  if n > 16:
    assert perm != list(range(n)) and perm != [feistel_permutation(i, n, 43) for i in range(n)]
  with pytest.raises(IndexError):
    feistel_permutation(n, n, 42)


def test_every_record_once_per_epoch():
  sizes = [7, 3, 11]
  plan = StreamPlan(lambda step: np.array([0.5, 0.2, 0.3]), sizes, seed=3, process=1,
                    examples_per_step=4, block=16)
  draws = {k: [] for k in range(3)}
  for i in range(2000):
    k, j = plan.locate(i)
    draws[k].append(j)
  for k, n in enumerate(sizes):
    d = draws[k]
    epochs = [d[e * n:(e + 1) * n] for e in range(len(d) // n)]
    assert all(sorted(e) == list(range(n)) for e in epochs), 'each epoch covers the shard once'
    assert len({tuple(e) for e in epochs}) > 1, 'a fresh order each epoch'


def test_block_counts_are_exact_and_unbiased():
  w = np.array([0.7, 0.29, 0.01])
  plan = StreamPlan(lambda step: w, [100] * 3, 0, 0, 8, block=64)
  counts = np.array([np.bincount(plan.block_sources(b), minlength=3) for b in range(400)])
  assert np.all(counts.sum(1) == 64)
  assert np.all(np.abs(counts - 64 * w) < 1.0 + 1e-9), 'systematic rounding: within 1 of target'
  np.testing.assert_allclose(counts.mean(0) / 64, w, atol=0.002)
  assert counts[:, 2].sum() > 0, 'tiny weights are still drawn'


def test_pickled_plan_agrees():
  plan = StreamPlan(lambda step: np.array([0.6, 0.4]), [9, 4], 0, 0, 2)
  first = [plan.locate(i) for i in range(300)]
  clone = pickle.loads(pickle.dumps(StreamPlan(_w, [9, 4], 0, 0, 2)))
  plan2 = StreamPlan(_w, [9, 4], 0, 0, 2)
  assert [clone.locate(i) for i in range(300)] == [plan2.locate(i) for i in range(300)] == first


def _w(step):
  return np.array([0.6, 0.4])


def test_locate_is_thread_safe():
  """grain's read threads call ``locate`` concurrently: the lazily grown block prefix sums must
  not gain a duplicate entry (which shifts every later block onto other records)."""
  import concurrent.futures
  import random

  def weights(step):
    return np.array([0.5, 0.3, 0.2])

  sizes = [1000, 700, 300]
  want = [StreamPlan(weights, sizes, 1, 0, 8, block=16).locate(i) for i in range(2000)]
  for trial in range(3):
    plan = StreamPlan(weights, sizes, 1, 0, 8, block=16)
    order = list(range(2000))
    random.Random(trial).shuffle(order)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      got = dict(zip(order, pool.map(plan.locate, order)))
    assert [got[i] for i in range(2000)] == want, f'trial {trial}'
