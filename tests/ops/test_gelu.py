"""The tanh GELU with an input-only backward: same values, same gradients, one residual."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from kimi_vl_jax.ops.gelu import gelu_tanh


def _ref(x):
  return jax.nn.gelu(x, approximate=True)


def test_values_equal_jax_gelu():
  x = jnp.linspace(-8.0, 8.0, 1001, dtype=jnp.float32).reshape(7, 143)
  chex.assert_trees_all_equal(gelu_tanh(x), _ref(x))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_gradient_matches_autodiff(dtype):
  x = (jax.random.normal(jax.random.PRNGKey(0), (5, 64)) * 3).astype(dtype)
  w = jax.random.normal(jax.random.PRNGKey(1), (5, 64)).astype(dtype)
  loss = lambda f: lambda x: jnp.sum((f(x) * w).astype(jnp.float32))
  got = jax.grad(loss(gelu_tanh))(x)
  assert got.dtype == dtype
  # fp32 autodiff at the same (rounded) inputs is the truth for both dtypes.
  x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
  want = jax.grad(lambda x: jnp.sum(_ref(x) * w32))(x32)
  if dtype == jnp.float32:
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
  else:
    # Ours differentiates in fp32 and rounds once: within bf16 rounding of the truth, and
    # no worse than JAX's bf16 autodiff.
    err = np.abs(np.asarray(got, np.float32) - want)
    assert np.all(err <= 2 ** -8 * np.abs(want) + 1e-6), err.max()
    autodiff = np.asarray(jax.grad(loss(_ref))(x), np.float32)
    assert err.max() <= np.abs(autodiff - want).max()


def test_backward_keeps_only_the_input():
  # jax.nn.gelu's autodiff keeps several [*, mlp] intermediates (7 here); under a scan over
  # layers each is stacked per layer. Ours keeps x alone.
  x = jnp.ones((4, 8))
  assert len(saved_residuals(_ref, x)) > 1
  res = saved_residuals(gelu_tanh, x)
  assert len(res) == 1 and res[0][0].shape == x.shape
