"""SigLIP loss vs a naive per-pair reference; CoCa heads produce finite losses and gradients."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import FrozenConfigDict

from kimi_vl_jax.train import coca, siglip


def _naive(zi, zt, t, b, valid):
  zi = np.asarray(zi, np.float64)
  zt = np.asarray(zt, np.float64)
  zi /= np.linalg.norm(zi, axis=1, keepdims=True)
  zt /= np.linalg.norm(zt, axis=1, keepdims=True)
  total, n = 0.0, int(sum(valid))
  for i in range(len(zi)):
    for j in range(len(zt)):
      if not (valid[i] and valid[j]):
        continue
      logit = math.exp(t) * float(zi[i] @ zt[j]) + b
      label = 1.0 if i == j else -1.0
      total += math.log1p(math.exp(-label * logit))
  return total / n


def test_siglip_matches_naive_reference():
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  zi = jax.random.normal(k1, (6, 4))
  zt = jax.random.normal(k2, (6, 4))
  valid = [True, True, True, True, False, True]
  got = siglip.siglip_loss(zi, zt, jnp.float32(1.3), jnp.float32(-2.0), jnp.array(valid))
  np.testing.assert_allclose(got, _naive(zi, zt, 1.3, -2.0, valid), rtol=1e-5)
  got_all = siglip.siglip_loss(zi, zt, jnp.float32(1.3), jnp.float32(-2.0))
  np.testing.assert_allclose(got_all, _naive(zi, zt, 1.3, -2.0, [True] * 6), rtol=1e-5)


def test_siglip_loss_prefers_matching_pairs():
  z = jax.random.normal(jax.random.PRNGKey(2), (8, 16))
  matched = siglip.siglip_loss(z, z, jnp.float32(2.3), jnp.float32(-10.0 / 8))
  shuffled = siglip.siglip_loss(z, jnp.roll(z, 1, axis=0), jnp.float32(2.3), jnp.float32(-10.0 / 8))
  assert matched < shuffled


def test_coca_heads_loss_and_grads_finite():
  cfg = FrozenConfigDict(dict(vocab_size=50, width=16, layers=1, heads=2, mlp=32, max_len=8, embed_dim=8))
  heads = coca.CocaHeads(cfg)
  feats = jax.random.normal(jax.random.PRNGKey(3), (4, 6, 12))
  pmask = jnp.array([[1] * 6, [1] * 4 + [0] * 2, [1] * 6, [0] * 6])
  cap = jax.random.randint(jax.random.PRNGKey(4), (4, 8), 1, 50)
  cmask = jnp.array([[1] * 8, [1] * 5 + [0] * 3, [1] * 8, [1] * 8])
  variables = jax.jit(heads.init)(jax.random.PRNGKey(0), feats, pmask, cap, cmask)

  def loss(p):
    out = heads.apply({'params': p}, feats, pmask, cap, cmask)
    return out['loss'], out

  (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  chex.assert_tree_all_finite((value, grads))
  np.testing.assert_allclose(value, out['siglip'] + 2 * out['caption'], rtol=1e-6)
  assert float(jnp.abs(grads['log_temperature'])) > 0
