"""LayerNorm over the last axis with a hand-written backward (fp32 statistics).

Forward, as torch and ``flax.linen.LayerNorm(use_fast_variance=False)`` compute it:
``y = (x - mean) / sqrt(mean((x - mean)^2) + eps) * scale + bias``, statistics in fp32,
the result cast to ``x``'s dtype.

Why a custom VJP: differentiated by JAX, the backward's per-row sums of products
(``sum(g * scale * xhat)``) lower on XLA:CPU to reduce(multiply) fusions that run ~10x slower
than the same contraction written as a dot (2.4 ms vs 0.23 ms for 4480 x 192 rows here), and
the layer keeps several [rows, D] fp32 intermediates for the backward. This backward keeps
``x`` plus per-row mean and 1/std, and writes the row sums as ``einsum`` contractions:

  xhat = (x - mean) * rstd,   gs = g * scale
  dx = rstd * (gs - mean_d(gs) - xhat * mean_d(gs * xhat))
  dscale = sum_rows(g * xhat),   dbias = sum_rows(g)
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _stats(x32, eps):
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  xc = x32 - mean
  rstd = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
  return mean, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """LayerNorm of ``x [..., D]`` with ``scale``/``bias [D]``; returns x's dtype."""
  return _fwd(x, scale, bias, eps)[0]


def _fwd(x, scale, bias, eps):
  x32 = x.astype(jnp.float32)
  mean, rstd = _stats(x32, eps)
  y = (x32 - mean) * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(x.dtype), (x, scale, bias, mean, rstd)


def _bwd(eps, res, g):
  del eps
  x, scale, bias, mean, rstd = res
  d = x.shape[-1]
  g32, scale32 = g.astype(jnp.float32), scale.astype(jnp.float32)
  xhat = (x.astype(jnp.float32) - mean) * rstd
  gs = g32 * scale32
  # Row sums as contractions (dots), not reduce(multiply): see the module docstring.
  mean_gs = jnp.einsum('...d,d->...', g32, scale32)[..., None] / d
  mean_gsx = jnp.einsum('...d,...d->...', gs, xhat)[..., None] / d
  dx = rstd * (gs - mean_gs - xhat * mean_gsx)
  rows = 'abcdefgh'[:x.ndim - 1]
  dscale = jnp.einsum(f'{rows}z,{rows}z->z', g32, xhat)
  dbias = jnp.sum(g32, axis=tuple(range(x.ndim - 1)))
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


layer_norm.defvjp(_fwd, _bwd)
