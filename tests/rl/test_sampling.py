"""ProblemSampler: curriculum pools, prioritized frequencies, determinism, argument errors."""
import numpy as np
import pytest

from kimi_vl_jax.rl.sampling import ProblemSampler


def test_uniform_distinct_and_deterministic():
  s = ProblemSampler(np.zeros(50), 'uniform', seed=3)
  a = s.sample(10, 4, 20)
  assert a.shape == (10,) and a.dtype == np.int64 and len(set(a.tolist())) == 10
  np.testing.assert_array_equal(a, ProblemSampler(np.zeros(50), 'uniform', seed=3).sample(10, 4, 20))
  assert not np.array_equal(a, s.sample(10, 5, 20))        # another iteration, another draw
  assert not np.array_equal(a, ProblemSampler(np.zeros(50), 'uniform', seed=4).sample(10, 4, 20))


def test_curriculum_easiest_fraction_first_then_all():
  rng = np.random.default_rng(0)
  difficulty = rng.permutation(100).astype(float)   # rank of problem i == difficulty[i]
  s = ProblemSampler(difficulty, 'curriculum', seed=1, curriculum_start=0.3)
  assert s.num_eligible(8, 0, 10) == 30
  assert s.num_eligible(8, 5, 10) == 65                     # 0.3 + 0.7 * 0.5 = 0.65
  assert s.num_eligible(8, 10, 10) == 100
  assert s.num_eligible(40, 0, 10) == 40                    # never fewer than n
  start = np.concatenate([ProblemSampler(difficulty, 'curriculum', seed=k).sample(8, 0, 10)
                          for k in range(50)])
  assert difficulty[start].max() < 30
  assert len(set(start.tolist())) == 30                     # the whole easy pool is reachable
  end = np.concatenate([s.sample(8, i, 10) for i in range(10, 60)])
  assert difficulty[end].max() >= 90                        # hard problems now drawn
  assert len(set(end.tolist())) > 90


def test_curriculum_deterministic_for_seed_and_iteration():
  d = np.arange(40, dtype=float)
  a = ProblemSampler(d, 'curriculum', seed=7).sample(5, 3, 10)
  b = ProblemSampler(d, 'curriculum', seed=7).sample(5, 3, 10)
  np.testing.assert_array_equal(a, b)


def test_prioritized_prefers_unsolved():
  n_prob = 40
  s = ProblemSampler(np.zeros(n_prob), 'prioritized', seed=0)
  solved = np.arange(0, n_prob, 2)                    # success rate 0.9: weight 0.1
  s.update(solved, np.tile([1, 1, 1, 1, 1, 1, 1, 1, 1, 0], (solved.size, 1)))
  np.testing.assert_allclose(s.success_rate[solved], 0.9)
  np.testing.assert_array_equal(s.success_rate[1::2], 0.0)   # unattempted: full priority
  counts = np.bincount(np.concatenate([s.sample(1, i, 10) for i in range(20000)]),
                       minlength=n_prob)
  # One draw: P(solved group) = 20 * 0.1 / (20 * 0.1 + 20 * 1.0) = 1/11.
  frac_solved = counts[solved].sum() / counts.sum()
  assert abs(frac_solved - 1 / 11) < 0.01, frac_solved
  # Batches of 5 (without replacement) still favour unsolved problems strongly.
  counts5 = np.bincount(np.concatenate([s.sample(5, i, 10) for i in range(2000)]),
                        minlength=n_prob)
  assert counts5[solved].mean() < 0.2 * counts5[1::2].mean()


def test_prioritized_running_mean_and_fallbacks():
  s = ProblemSampler(np.zeros(6), 'prioritized', seed=0)
  s.update(np.array([0, 0, 1]), np.array([1.0, 0.0, 1.0]))   # repeated index: two attempts
  np.testing.assert_allclose(s.success_rate[:3], [0.5, 1.0, 0.0])
  s.update(np.arange(6), np.ones(6))                          # now 0: 2/3, 1..5: 1.0
  for i in range(20):
    out = s.sample(3, i, 10)
    assert 0 in out and len(set(out.tolist())) == 3           # the only live one, then fill
  s.update(np.array([0]), np.ones((1, 4)))                    # all solved: uniform
  out = np.concatenate([s.sample(2, i, 10) for i in range(200)])
  assert set(out.tolist()) == set(range(6))


def test_state_round_trip_through_json():
  import json
  s = ProblemSampler(np.zeros(10), 'prioritized', seed=2)
  s.update(np.array([1, 2, 2]), np.array([[1, 0], [1, 1], [0, 0]]))
  t = ProblemSampler(np.zeros(10), 'prioritized', seed=2)
  t.set_state(json.loads(json.dumps(s.get_state())))
  np.testing.assert_array_equal(t.success_rate, s.success_rate)
  np.testing.assert_allclose(t.success_rate[[1, 2]], [0.5, 0.5])
  np.testing.assert_array_equal(t.sample(4, 9, 10), s.sample(4, 9, 10))
  t.set_state({})
  np.testing.assert_array_equal(t.success_rate, 0.0)
  with pytest.raises(ValueError, match='state'):
    t.set_state({'attempts': [0] * 3, 'successes': [0.0] * 3})


def test_bad_arguments_name_the_argument():
  with pytest.raises(ValueError, match='mode'):
    ProblemSampler(np.zeros(4), 'hardest_first')
  with pytest.raises(ValueError, match='difficulty'):
    ProblemSampler(np.zeros((2, 3)), 'uniform')
  with pytest.raises(ValueError, match='curriculum_start'):
    ProblemSampler(np.zeros(4), 'curriculum', curriculum_start=0.0)
  s = ProblemSampler(np.zeros(4), 'uniform')
  with pytest.raises(ValueError, match='^n: expected'):
    s.sample(0, 0, 10)
  with pytest.raises(ValueError, match='^n: 5'):
    s.sample(5, 0, 10)
  with pytest.raises(ValueError, match='total_iterations'):
    s.sample(2, 0, 0)
  with pytest.raises(ValueError, match='iteration'):
    s.sample(2, -1, 10)
  with pytest.raises(ValueError, match='correct'):
    s.update(np.array([0, 1]), np.ones(3))
  with pytest.raises(ValueError, match='indices'):
    s.update(np.array([9]), np.ones(1))
