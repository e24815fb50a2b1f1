"""RMSNorm as the checkpoints compute it: normalize in fp32, cast back, then scale by the weight."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


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
