"""Norm layers: RMSNorm as the LM checkpoints compute it (normalize in fp32, cast back, then
scale by the weight) and LayerNorm for the vision tower (``ops/layer_norm``: fp32 statistics,
a backward written for XLA:CPU)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kimi_vl_jax.ops.layer_norm import layer_norm


class RMSNorm(nn.Module):
  """``weight * cast(x / sqrt(mean(x^2) + eps))``; weight [D] (logical 'norm'), initialized to ones."""
  eps: float = 1e-5
  param_dtype: str = 'float32'

  @nn.compact
  def __call__(self, x_bsd: jax.Array) -> jax.Array:
    d = x_bsd.shape[-1]
    scale_d = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                         (d,), jnp.dtype(self.param_dtype))
    x32 = x_bsd.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # Cast to the input dtype BEFORE the weight multiply (the reference order), then the
    # product promotes like torch's (weight * x.to(dtype)).
    return (scale_d.astype(x_bsd.dtype) * y.astype(x_bsd.dtype)).astype(x_bsd.dtype)


class LayerNorm(nn.Module):
  """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis, statistics in fp32.

  Same parameters (``scale`` ones, ``bias`` zeros, logical 'norm') and values as
  ``flax.linen.LayerNorm(use_fast_variance=False)`` and torch's ``nn.LayerNorm``; the output
  takes ``dtype``.
  """
  epsilon: float = 1e-5
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    init = lambda f: nn.with_logical_partitioning(f, ('norm',))
    scale = self.param('scale', init(nn.initializers.ones_init()), (d,), jnp.dtype(self.param_dtype))
    bias = self.param('bias', init(nn.initializers.zeros_init()), (d,), jnp.dtype(self.param_dtype))
    # Statistics from x as given (fp32 inside), then the compute dtype, as flax's LayerNorm.
    return layer_norm(x, scale, bias, self.epsilon).astype(jnp.dtype(self.dtype))
