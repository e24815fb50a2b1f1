"""tanh-approximate GELU with a backward that keeps only its input.

``jax.nn.gelu(approximate=True)`` differentiated by JAX keeps several [tokens, mlp] fp32
intermediates per layer for the backward (the cube, the tanh, their products); under a scan
over layers each one is stacked into a per-layer buffer. Here the VJP saves only ``x`` and
recomputes the derivative in one fused elementwise pass:

  gelu(x)  = 0.5 x (1 + tanh(u)),   u = c (x + 0.044715 x^3),   c = sqrt(2 / pi)
  gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 * 0.044715 x^2),   t = tanh(u)

Values equal ``jax.nn.gelu(x, approximate=True)``; gradients agree to float rounding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_C = float(np.sqrt(2.0 / np.pi))
_A = 0.044715


@jax.custom_vjp
def gelu_tanh(x: jax.Array) -> jax.Array:
  """tanh-approximate GELU, elementwise, any shape and float dtype."""
  return jax.nn.gelu(x, approximate=True)


def _fwd(x):
  return gelu_tanh(x), x


def _bwd(x, g):
  xf = x.astype(jnp.float32)
  t = jnp.tanh(_C * (xf + _A * xf * xf * xf))
  d = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * _C * (1.0 + 3.0 * _A * xf * xf)
  return ((g.astype(jnp.float32) * d).astype(x.dtype),)


gelu_tanh.defvjp(_fwd, _bwd)
