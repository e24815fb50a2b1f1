"""RMSNorm: fp32 normalize, cast to the input dtype, then weight (the reference order)."""
import jax
import jax.numpy as jnp
import numpy as np

from kimi_vl_jax.models.norms import RMSNorm


def test_rmsnorm_reference_order_bf16():
  x = jnp.asarray(np.random.RandomState(0).randn(2, 3, 16) * 5, jnp.bfloat16)
  norm = RMSNorm(eps=1e-6)
  variables = norm.init(jax.random.PRNGKey(0), x)
  w = jnp.asarray(np.random.RandomState(1).rand(16) + 0.5, jnp.float32)
  y = norm.apply({'params': {'scale': w}}, x)
  x32 = x.astype(jnp.float32)
  ref = w.astype(jnp.bfloat16) * (x32 / jnp.sqrt(jnp.mean(x32 ** 2, -1, keepdims=True) + 1e-6)
                                  ).astype(jnp.bfloat16)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(ref, np.float32))
  assert variables['params']['scale'].value.shape == (16,)
  # fp32 input: unit RMS when the weight is one.
  x = jnp.asarray(np.random.RandomState(2).randn(4, 32), jnp.float32)
  y = RMSNorm(eps=0.0).apply({'params': {'scale': jnp.ones(32)}}, x)
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(y ** 2, -1)), 1.0, rtol=1e-5)
