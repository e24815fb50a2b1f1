"""Rewards: the k1.5 length penalty and shaped rewards."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_vl_jax.rl import rewards


def test_length_penalty_hand_worked():
  # min 10, max 30: lam = 0.5 - (len - 10) / 20 = [0.5, 0.0, -0.5].
  len_pk = jnp.array([[10, 20, 30], [10, 20, 30], [7, 7, 7]])
  correct_pk = jnp.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]])
  lp_pk = rewards.length_penalty(len_pk, correct_pk)
  chex.assert_shape(lp_pk, (3, 3))
  np.testing.assert_allclose(lp_pk[0], [0.5, 0.0, -0.5])
  # Wrong samples get min(0, lam): the short wrong one gets 0, not +0.5.
  np.testing.assert_allclose(lp_pk[1], [0.0, 0.0, -0.5])
  np.testing.assert_allclose(lp_pk[2], [0.0, 0.0, 0.0])  # equal lengths: no penalty


def test_length_penalty_rows_are_independent_and_shapes():
  len_pk = jnp.array([[5, 5], [1, 3], [4, 4]], jnp.float32)
  correct_pk = jnp.ones((3, 2), bool)
  lp_pk = rewards.length_penalty(len_pk, correct_pk)
  chex.assert_shape(lp_pk, (3, 2))
  np.testing.assert_allclose(lp_pk, [[0, 0], [0.5, -0.5], [0, 0]])
  assert np.all(np.isfinite(lp_pk))
  with pytest.raises(ValueError, match='correct_pk'):
    rewards.length_penalty(len_pk, correct_pk[:2])
  with pytest.raises(ValueError, match='len_pk'):
    rewards.length_penalty(jnp.ones((4,)), jnp.ones((4,)))


def test_shaped_rewards_weight_and_traced_warmup_switch():
  len_pk = jnp.array([[10, 20, 30]])
  correct_pk = jnp.array([[1, 0, 1]])
  f = jax.jit(lambda active: rewards.shaped_rewards(correct_pk, len_pk, 0.2, active))
  np.testing.assert_allclose(f(jnp.array(False)), [[1.0, 0.0, 1.0]])
  np.testing.assert_allclose(f(jnp.array(True)), [[1.1, 0.0, 0.9]], rtol=1e-6)
  np.testing.assert_allclose(rewards.shaped_rewards(correct_pk, len_pk, 0.2, 1),
                             [[1.1, 0.0, 0.9]], rtol=1e-6)
