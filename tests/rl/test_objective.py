"""Mirror-descent objective: gradients vs the squared surrogate, stop-gradients, sequence sums."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_vl_jax.rl import objective

P, K, TAU = 3, 4, 0.3


def _inputs(seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  logp = -jnp.abs(jax.random.normal(k[0], (P, K))) * 5.0
  logp_ref = logp + 0.5 * jax.random.normal(k[1], (P, K))
  r = jax.random.bernoulli(k[2], 0.5, (P, K)).astype(jnp.float32)
  return logp, logp_ref, r


def _loss(logp, logp_ref, r, tau=TAU):
  return objective.mirror_descent_loss(logp, logp_ref, r, tau)[0]


def test_gradient_relation_to_squared_surrogate():
  # With a = r - mean_j r and d = logp - logp_ref (r, logp_ref constant):
  #   d surrogate / d logp = -(2 tau / (P K)) (a - tau d)
  #   d loss      / d logp = -(1 / (P K)) (a - tau d)
  # so grad surrogate == 2 * tau * grad loss, at any logp (not only at logp == logp_ref).
  logp, logp_ref, r = _inputs()
  g_loss = jax.grad(_loss)(logp, logp_ref, r)
  g_sur = jax.grad(objective.squared_surrogate)(logp, logp_ref, r, TAU)
  chex.assert_trees_all_close(g_sur, 2 * TAU * g_loss, rtol=1e-5, atol=1e-7)
  a = r - r.mean(axis=1, keepdims=True)
  d = logp - logp_ref
  chex.assert_trees_all_close(g_loss, -(a - TAU * d) / (P * K), rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(g_sur, -2 * TAU * (a - TAU * d) / (P * K), rtol=1e-5, atol=1e-7)
  assert float(jnp.max(jnp.abs(d))) > 0.1  # the tau * d term is really exercised


def test_gradient_at_reference_is_baseline_advantage():
  logp, _, r = _inputs(1)
  g = jax.grad(_loss)(logp, logp, r)
  a = r - r.mean(axis=1, keepdims=True)
  assert float(jnp.max(jnp.abs(a))) > 0  # not a degenerate all-equal batch
  chex.assert_trees_all_close(g, -a / (P * K), rtol=1e-6, atol=1e-8)
  chex.assert_trees_all_close(jax.grad(objective.squared_surrogate)(logp, logp, r, TAU),
                              -2 * TAU * a / (P * K), rtol=1e-6, atol=1e-8)


def test_no_gradient_into_reference_or_reward():
  logp, logp_ref, r = _inputs(2)
  g_ref, g_r = jax.grad(_loss, argnums=(1, 2))(logp, logp_ref, r)
  np.testing.assert_array_equal(g_ref, 0.0)
  np.testing.assert_array_equal(g_r, 0.0)
  g_ref, g_r = jax.grad(objective.squared_surrogate, argnums=(1, 2))(logp, logp_ref, r, TAU)
  np.testing.assert_array_equal(g_ref, 0.0)
  np.testing.assert_array_equal(g_r, 0.0)


def test_loss_value_and_metrics():
  logp, logp_ref, r = _inputs(3)
  loss, m = jax.jit(objective.mirror_descent_loss, static_argnums=3)(logp, logp_ref, r, TAU)
  a = r - r.mean(axis=1, keepdims=True)
  d = logp - logp_ref
  np.testing.assert_allclose(loss, jnp.mean(-a * logp + 0.5 * TAU * d**2), rtol=1e-6)
  np.testing.assert_allclose(m['reward_mean'], r.mean(), rtol=1e-6)
  np.testing.assert_allclose(m['advantage_abs_mean'], jnp.abs(a).mean(), rtol=1e-6)
  np.testing.assert_allclose(m['log_ratio_mean'], d.mean(), rtol=1e-6)
  np.testing.assert_allclose(m['log_ratio_sq_mean'], (d**2).mean(), rtol=1e-6)
  np.testing.assert_allclose(objective.squared_surrogate(logp, logp_ref, r, TAU),
                             jnp.mean((a - TAU * d)**2), rtol=1e-6)
  with pytest.raises(ValueError, match='r_pk'):
    objective.mirror_descent_loss(logp, logp_ref, r[:, :2], TAU)


def test_sequence_logprobs_masks_non_response_tokens():
  token_logp_bs = jnp.array([[-np.inf, -1.0, -2.0, np.nan],
                             [-0.5, -0.25, -4.0, -8.0]], jnp.bfloat16)
  mask_bs = jnp.array([[0, 1, 1, 0], [0, 0, 1, 1]])
  logp_b = objective.sequence_logprobs(token_logp_bs, mask_bs)
  chex.assert_shape(logp_b, (2,))
  assert logp_b.dtype == jnp.float32
  np.testing.assert_array_equal(logp_b, [-3.0, -12.0])
  g = jax.grad(lambda x: objective.sequence_logprobs(x, mask_bs).sum())(
      token_logp_bs.astype(jnp.float32))
  np.testing.assert_array_equal(g, mask_bs.astype(jnp.float32))
  with pytest.raises(ValueError, match='response_mask_bs'):
    objective.sequence_logprobs(token_logp_bs, mask_bs[:, :3])
