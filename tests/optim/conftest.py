"""A tiny boxed parameter tree with every kind of leaf the router must handle."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest


def _box(rng, shape, names, scale=0.1):
  return nn.LogicallyPartitioned(jnp.asarray(scale * rng.standard_normal(shape), jnp.float32), names)


def tiny_params(seed: int = 0) -> dict:
  """Dense kernels, a scanned [L, in, out] stack, a [L, embed, heads, kv] projection,
  an [E, in, out] expert stack, embeddings, lm_head, norms and biases."""
  rng = np.random.default_rng(seed)   # host RNG: no per-leaf compiles
  return {
      'embed_tokens': {'embedding': _box(rng, (64, 32), ('vocab', 'embed'))},
      'dense': {'kernel': _box(rng, (32, 64), ('embed', 'mlp')),
                'bias': _box(rng, (64,), ('mlp',))},
      'layers': {
          'mlp': {'kernel': _box(rng, (4, 32, 64), ('layers', 'embed', 'mlp'))},
          'q_proj': {'kernel': _box(rng, (4, 32, 4, 8), ('layers', 'embed', 'heads', 'kv'))},
          'o_proj': {'kernel': _box(rng, (4, 4, 8, 32), ('layers', 'heads', 'kv', 'embed'))},
          'input_norm': {'scale': _box(rng, (4, 32), ('layers', 'norm'))},
      },
      'moe': {'gate': {'kernel': _box(rng, (32, 8), ('embed', 'experts'))},
              'experts': {'wi': _box(rng, (8, 32, 16), ('experts', 'embed', 'expert_mlp')),
                          # 4 experts: too few to hold every mesh axis of the tests
                          'wo': _box(rng, (4, 16, 32), ('experts', 'expert_mlp', 'embed'))}},
      'final_norm': {'scale': _box(rng, (32,), ('norm',))},
      'lm_head': {'kernel': _box(rng, (32, 64), ('embed', 'vocab'))},
  }


def tiny_grads(params, step):
  """Deterministic pseudo-gradients for ``step`` (unboxed, params-shaped, full rank).

  Elementwise functions of the (random) weights and the step, so they vary per step and
  per entry without an RNG (threefry costs ~20 s of compile on a loaded 2-core CPU).
  """
  step = jnp.asarray(step, jnp.float32)
  return jax.tree.map(lambda x: 0.05 * x + 0.01 * jnp.sin(x * (17.0 + 3.0 * step) + step), params)


class _Tiny:
  params = staticmethod(tiny_params)
  grads = staticmethod(tiny_grads)


@pytest.fixture
def tiny():
  """Helpers for the tests: ``tiny.params(seed)`` (boxed), ``tiny.grads(params, step)``."""
  return _Tiny
