"""Muon's math (SPEC §4.1), as pure functions on one parameter.

    M_t = mu * M_{t-1} + G_t                    (sum-form momentum, mu = 0.95)
    N_t = G_t + mu * M_t                        (Nesterov)
    O_t = NS(N_t / ||N_t||_F)                   (quintic Newton-Schulz, (3.4445, -4.7750, 2.0315))
    W_t = W_{t-1} - lr * (0.2 * sqrt(max(A, B)) * O_t + wd * W_{t-1})

A parameter is a stack of matrices: its ``reduction`` axes flatten to the matrix rows (A),
its ``output`` axes to the columns (B), and every other axis is a batch axis (scan layers,
experts) whose matrices are orthogonalized one by one. A and B are the FULL matrix's sizes,
also when the caller holds only a slice of the batch (ZeRO-1, ``zero1.py``).
The sum-form momentum differs from optax's EMA form only by the factor (1 - mu), which the
Frobenius normalization removes (up to eps).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

NS_COEFFS = (3.4445, -4.7750, 2.0315)
RMS_MATCH = 0.2          # Moonlight's update-RMS target (AdamW's typical update RMS)
NS_EPS = 1e-8            # added to the Frobenius norm (as optax does)


def newton_schulz(x_nab: jax.Array, steps: int = 5, dtype=jnp.float32,
                  coeffs=NS_COEFFS, eps: float = NS_EPS) -> jax.Array:
  """Approximately orthogonalizes each matrix of a stack [N, A, B]; returns float32 [N, A, B].

  Each matrix is divided by its Frobenius norm (so all singular values are <= 1) and
  iterated ``X <- a X + (b S + c S^2) X`` with ``S = X X^T``, computed on the wide
  orientation (transposed once, before the iterations, when A > B, so S is the smaller Gram
  matrix): the iterate is carried in ``dtype`` and each product multiplies ``dtype``
  operands with fp32 accumulation (bf16 x bf16 -> fp32, as on accelerators; ~3x faster than
  fp32 here on CPUs with AMX); the polynomial's sums are fp32.

  On CPU the stack is walked matrix by matrix (a ``fori_loop``) with plain 2-D dots: XLA:CPU runs
  a batched dot_general over [N, m, n] ~2x slower than the same work as N 2-D dots (measured
  on the bench preset's 192 x [256, 128] expert stacks: ~40 vs ~90 GFLOP/s fp32); orienting
  and normalizing inside the per-matrix body (not as passes over the whole stack) saves
  another ~10%. Other backends run the whole stack as one batched dot_general per product.
  """
  a, b, c = coeffs
  tall = x_nab.shape[-2] > x_nab.shape[-1]

  def mm(eq, u, v):
    # ``dtype`` operands, fp32 accumulation and result (for fp32: plain fp32 NS).
    return jnp.einsum(eq, u.astype(dtype), v.astype(dtype), preferred_element_type=jnp.float32)

  def step(_, x_mn):
    """One iteration on a wide matrix [..., m, n] (m <= n), carried in ``dtype``."""
    s_mm = mm('...ab,...cb->...ac', x_mn, x_mn)                       # X X^T
    poly_mm = b * s_mm + c * mm('...ab,...bc->...ac', s_mm, s_mm)
    return (a * x_mn.astype(jnp.float32) + mm('...ab,...bc->...ac', poly_mm, x_mn)).astype(dtype)

  def orthogonalize(x_ab):
    """[..., A, B] -> float32 [..., A, B]: normalize, then ``steps`` iterations."""
    x = jnp.swapaxes(x_ab, -1, -2) if tall else x_ab
    x = x.astype(dtype)
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(-2, -1), keepdims=True))
    x = (x.astype(jnp.float32) / (norm + eps)).astype(dtype)
    if tall:
      # Keeps the transpose a materialized array: folded into the dot of a single step (the
      # loop removed), it leaves a bf16 x bf16 -> f32 dot that XLA:CPU cannot run.
      x = jax.lax.optimization_barrier(x)
    # A loop, not 5 unrolled copies: one Muon leaf's HLO stays small (compile time).
    x = jax.lax.fori_loop(0, steps, step, x).astype(jnp.float32)
    return jnp.swapaxes(x, -1, -2) if tall else x

  def one_by_one(x):
    # Each result overwrites its input matrix in the carried stack (in place: no zero-filled
    # output stack as ``lax.map`` allocates, one pass over [N, A, B] less).
    def body(i, x):
      return jax.lax.dynamic_update_index_in_dim(
          x, orthogonalize(jax.lax.dynamic_index_in_dim(x, i, keepdims=False)), i, 0)
    return jax.lax.fori_loop(0, x.shape[0], body, x.astype(jnp.float32))

  return jax.lax.platform_dependent(x_nab, cpu=one_by_one, default=orthogonalize)


def to_matrices(x: jax.Array, reduction: Sequence[int], output: Sequence[int],
                batch: Sequence[int]) -> jax.Array:
  """[..] -> [N, A, B]: batch axes flattened to N, reduction to A, output to B."""
  order = tuple(batch) + tuple(reduction) + tuple(output)
  n = math.prod(x.shape[i] for i in batch)
  a = math.prod(x.shape[i] for i in reduction)
  return jnp.transpose(x, order).reshape(n, a, -1)


def from_matrices(y_nab: jax.Array, shape: Sequence[int], reduction: Sequence[int],
                  output: Sequence[int], batch: Sequence[int]) -> jax.Array:
  """Inverse of ``to_matrices`` for a tensor of ``shape``."""
  order = tuple(batch) + tuple(reduction) + tuple(output)
  y = y_nab.reshape(tuple(shape[i] for i in order))
  return jnp.transpose(y, tuple(order.index(i) for i in range(len(shape))))


def rms_scale(matrix_shape: tuple[int, int]) -> float:
  """0.2 * sqrt(max(A, B)) of the FULL matrix: O's RMS is ~1/sqrt(max(A, B))."""
  return RMS_MATCH * math.sqrt(max(matrix_shape))


def nesterov_momentum(grad: jax.Array, mom: jax.Array, mu: float) -> tuple[jax.Array, jax.Array]:
  """(N_t, M_t) from G_t and M_{t-1} (sum form, float32)."""
  mom = mu * mom + grad.astype(mom.dtype)
  return grad.astype(mom.dtype) + mu * mom, mom


def orthogonalized(n: jax.Array, reduction, output, batch, steps: int = 5,
                   dtype=jnp.float32) -> jax.Array:
  """NS(n), per matrix of the stack ``n`` (unscaled); float32, same shape as n."""
  mats = to_matrices(n, reduction, output, batch)
  return from_matrices(newton_schulz(mats, steps, dtype), n.shape, reduction, output, batch)


def adam_direction(grad, mu_m, nu_m, count_inc, b1: float, b2: float, eps: float):
  """AdamW's direction m_hat / (sqrt(v_hat) + eps) (optax.scale_by_adam, eps_root=0).

  Returns (direction, new first moment, new second moment); count_inc is the 1-based step.
  """
  g = grad.astype(mu_m.dtype)
  mu_m = b1 * mu_m + (1.0 - b1) * g
  nu_m = b2 * nu_m + (1.0 - b2) * jnp.square(g)
  t = count_inc.astype(jnp.float32)
  mu_hat = mu_m / (1.0 - b1 ** t)
  nu_hat = nu_m / (1.0 - b2 ** t)
  return mu_hat / (jnp.sqrt(nu_hat) + eps), mu_m, nu_m
