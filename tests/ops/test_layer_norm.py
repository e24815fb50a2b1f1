"""LayerNorm with the hand-written backward vs flax's LayerNorm and JAX autodiff."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_vl_jax.models.norms import LayerNorm
from kimi_vl_jax.ops.layer_norm import layer_norm


def _ref(x, scale, bias, eps):
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
  return ((x32 - mean) / jnp.sqrt(var + eps) * scale + bias).astype(x.dtype)


def _inputs(shape=(2, 37, 24), seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  x = jax.random.normal(ks[0], shape) * 3 + 1.5   # non-zero mean: the centring matters
  scale = 1 + 0.3 * jax.random.normal(ks[1], shape[-1:])
  bias = 0.2 * jax.random.normal(ks[2], shape[-1:])
  g = jax.random.normal(ks[3], shape)
  return x, scale, bias, g


def test_values_match_reference_and_flax():
  x, scale, bias, _ = _inputs()
  out = layer_norm(x, scale, bias, 1e-5)
  np.testing.assert_allclose(out, _ref(x, scale, bias, 1e-5), atol=1e-6, rtol=1e-6)
  flax_ln = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False)
  flax_out = flax_ln.apply({'params': {'scale': scale, 'bias': bias}}, x)
  np.testing.assert_allclose(out, flax_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('shape', [(2, 37, 24), (50, 8), (1, 3, 5, 16)])
def test_gradients_match_autodiff(shape):
  x, scale, bias, g = _inputs(shape, seed=len(shape))
  loss = lambda f: lambda x, s, b: jnp.sum(f(x, s, b, 1e-5) * g)
  got = jax.jit(jax.grad(loss(layer_norm), argnums=(0, 1, 2)))(x, scale, bias)
  want = jax.jit(jax.grad(loss(_ref), argnums=(0, 1, 2)))(x, scale, bias)
  for a, b in zip(got, want):
    chex.assert_equal_shape((a, b))
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


def test_bf16_input_keeps_dtype_and_fp32_statistics():
  x, scale, bias, g = _inputs()
  xb = x.astype(jnp.bfloat16)
  out = layer_norm(xb, scale, bias, 1e-5)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(_ref(xb.astype(jnp.float32), scale, bias, 1e-5)),
                             atol=3e-2, rtol=1e-2)
  dx, ds, db = jax.grad(lambda x, s, b: jnp.sum(layer_norm(x, s, b, 1e-5).astype(jnp.float32) * g),
                        argnums=(0, 1, 2))(xb, scale, bias)
  assert dx.dtype == jnp.bfloat16 and ds.dtype == db.dtype == jnp.float32


def test_module_has_flax_layernorm_params_and_compute_dtype():
  x, _, _, _ = _inputs()
  params = LayerNorm(epsilon=1e-6).init(jax.random.PRNGKey(0), x)['params']
  flax_params = nn.LayerNorm().init(jax.random.PRNGKey(0), x)['params']
  chex.assert_trees_all_equal(nn.unbox(params), flax_params)
  out = LayerNorm(epsilon=1e-6, dtype='bfloat16').apply({'params': params}, x)
  assert out.dtype == jnp.bfloat16
  # fp32 input with a bf16 compute dtype: statistics from the fp32 input, then cast.
  want = _ref(x, nn.unbox(params)['scale'], nn.unbox(params)['bias'], 1e-6).astype(jnp.bfloat16)
  chex.assert_trees_all_equal(out, want)
