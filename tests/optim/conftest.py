"""A tiny boxed parameter tree with every kind of leaf the router must handle."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest


def _box(key, shape, names, scale=0.1):
  return nn.LogicallyPartitioned(scale * jax.random.normal(key, shape, jnp.float32), names)


def tiny_params(seed: int = 0) -> dict:
  """Dense kernels, a scanned [L, in, out] stack, a [L, embed, heads, kv] projection,
  an [E, in, out] expert stack, embeddings, lm_head, norms and biases."""
  k = iter(jax.random.split(jax.random.key(seed), 16))
  return {
      'embed_tokens': {'embedding': _box(next(k), (64, 32), ('vocab', 'embed'))},
      'dense': {'kernel': _box(next(k), (32, 64), ('embed', 'mlp')),
                'bias': _box(next(k), (64,), ('mlp',))},
      'layers': {
          'mlp': {'kernel': _box(next(k), (4, 32, 64), ('layers', 'embed', 'mlp'))},
          'q_proj': {'kernel': _box(next(k), (4, 32, 4, 8), ('layers', 'embed', 'heads', 'kv'))},
          'o_proj': {'kernel': _box(next(k), (4, 4, 8, 32), ('layers', 'heads', 'kv', 'embed'))},
          'input_norm': {'scale': _box(next(k), (4, 32), ('layers', 'norm'))},
      },
      'moe': {'gate': {'kernel': _box(next(k), (32, 8), ('embed', 'experts'))},
              'experts': {'wi': _box(next(k), (8, 32, 16), ('experts', 'embed', 'expert_mlp'))}},
      'final_norm': {'scale': _box(next(k), (32,), ('norm',))},
      'lm_head': {'kernel': _box(next(k), (32, 64), ('embed', 'vocab'))},
  }


def tiny_grads(params, step: int):
  """Deterministic pseudo-gradients for step ``step`` (unboxed, params-shaped)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.fold_in(jax.random.key(123), step), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(kk, x.shape, x.dtype) * 0.01 + 0.05 * x
                                      for kk, x in zip(keys, leaves)])


class _Tiny:
  params = staticmethod(tiny_params)
  grads = staticmethod(tiny_grads)


@pytest.fixture
def tiny():
  """Helpers for the tests: ``tiny.params(seed)`` (boxed), ``tiny.grads(params, step)``."""
  return _Tiny
