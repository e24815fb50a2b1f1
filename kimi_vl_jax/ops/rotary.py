"""Rotary position embedding on the checkpoint's interleaved-pair layout (SPEC §3.1).

The DeepSeek-V3 / Moonlight checkpoints store the rope dims of q and k_pe as interleaved pairs:
pair j = (x[2j], x[2j+1]) rotates by ``pos * theta^(-2j/d)``. We rotate in place and keep the
interleaved layout; transformers' ``apply_rotary_pos_emb_interleave`` returns the same numbers
de-interleaved (evens then odds), a permutation shared by q and k, so every score q.k is equal.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_inv_freq(dim: int, theta: float) -> jax.Array:
  """[dim/2] inverse frequencies ``theta^(-2j/dim)`` in fp32 (as transformers computes them)."""
  if dim % 2:
    raise ValueError(f'rope dim must be even, got {dim}')
  return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def apply_rope_interleaved(x_bs_d: jax.Array, positions_bs: jax.Array, theta: float) -> jax.Array:
  """Rotates interleaved pairs of the last axis by position.

  Args:
    x_bs_d: [B, S, ..., D] (any number of axes between S and D, e.g. heads), D even.
    positions_bs: int [B, S] positions of each token (restart per packed segment).
    theta: rope base.
  Returns:
    Same shape and dtype as ``x_bs_d``; the rotation runs in fp32.
  """
  d = x_bs_d.shape[-1]
  angles_bsj = positions_bs.astype(jnp.float32)[..., None] * rope_inv_freq(d, theta)
  extra = x_bs_d.ndim - 3   # axes between S and D
  angles = angles_bsj.reshape(angles_bsj.shape[:2] + (1,) * extra + angles_bsj.shape[-1:])
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x = x_bs_d.astype(jnp.float32).reshape(x_bs_d.shape[:-1] + (d // 2, 2))
  x_even, x_odd = x[..., 0], x[..., 1]
  out = jnp.stack([x_even * cos - x_odd * sin, x_odd * cos + x_even * sin], axis=-1)
  return out.reshape(x_bs_d.shape).astype(x_bs_d.dtype)
