"""Routed-expert compute: tokens x top-k assignments -> sum_k w_k * Expert_{idx_k}(x).

One interface, ``expert_ffn``, several backends with the same result (up to capacity drops):

- ``dense``: every expert on every token, combined with one-hot weights. O(T * E) work; the
  test oracle.
- ``ragged``: sort the (token, expert) assignments by expert and run ``jax.lax.ragged_dot``
  (grouped GEMM). The TPU/GPU default. On CPU XLA lowers ragged_dot to roughly the cost of
  computing every expert, so it is not used there.
- ``capacity``: the CPU path, whose cost follows the active experts: assignments sorted into
  expert-major ``[E, C, D]`` buffers and one batched einsum per matmul (``moe_capacity``).
  ``capacity_factor > 0``: ``C = ceil(capacity_factor * T * K / E)``, assignments past it are
  dropped and counted. ``capacity_factor == 0``: dropless; experts sorted by load into groups,
  each group's C picked at run time from a ladder of static sizes that always ends in a fit.
- ``auto``: ``capacity`` on CPU, ``ragged`` elsewhere.

Every data movement (tokens -> buffer, buffer -> tokens) is a row gather with integer indices
whose backward pass is again a gather (``moe_layout.gather_rows``), never a one-hot matmul or
a scatter-add, because on CPU scatters and one-hot dispatch tensors dominate the step.

Shapes: T tokens, K = top-k, A = T * K assignments, E experts, D model width, F expert width.
Expert weights: ``w_gate_edf``, ``w_up_edf`` [E, D, F] and ``w_down_efd`` [E, F, D];
expert(x) = down(silu(x @ gate) * (x @ up)). An expert index equal to E (or any index outside
[0, E)) marks an assignment that is not routed (padding tokens); it contributes nothing.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kimi_vl_jax.ops.moe_capacity import (  # noqa: F401  (re-exported)
    capacity_expert_outputs, group_capacities, group_starts)
from kimi_vl_jax.ops.moe_layout import (  # noqa: F401  (re-exported)
    Plan, capacity_per_expert, gather_rows, plan_capacity, plan_ragged)
from kimi_vl_jax.parallel.mesh import target_platform

BACKENDS = ('auto', 'ragged', 'capacity', 'dense')


def resolve_backend(backend: str) -> str:
  """'auto' -> 'capacity' on CPU, 'ragged' on accelerators (the platform of the ambient mesh
  when there is one, ``parallel.mesh.target_platform``); other names pass through."""
  if backend not in BACKENDS:
    raise ValueError(f'moe_backend must be one of {", ".join(BACKENDS)}; got {backend!r}')
  if backend == 'auto':
    return 'capacity' if target_platform() == 'cpu' else 'ragged'
  return backend


# --------------------------------------------------------------------------------------------
# Expert compute.
# --------------------------------------------------------------------------------------------

def _swiglu(x, w_gate, w_up, w_down, eq_in: str, eq_out: str):
  g = jnp.einsum(eq_in, x, w_gate)
  u = jnp.einsum(eq_in, x, w_up)
  return jnp.einsum(eq_out, jax.nn.silu(g) * u, w_down)


def _combine(y_rd, plan: Plan, w_tk):
  """sum_k w[t, k] * y[slot(t, k)] in fp32 -> [T, D]."""
  t, k = w_tk.shape
  y_ad = gather_rows(y_rd, plan.slot_a, plan.assign_r[:, None])
  y_tkd = y_ad.reshape(t, k, -1).astype(jnp.float32)
  return jnp.einsum('tkd,tk->td', y_tkd, w_tk.astype(jnp.float32))


def _dispatch(x_td, plan: Plan, top_k: int):
  t = x_td.shape[0]
  return gather_rows(x_td, plan.token_r, plan.slot_a.reshape(t, top_k))


def expert_ffn(x_td, idx_tk, w_tk, w_gate_edf, w_up_edf, w_down_efd, *, backend: str = 'auto',
               capacity_factor: float = 0.0, dtype=None, expected_load: float | None = None):
  """Weighted sum of the top-k routed experts of every token.

  Args:
    x_td: [T, D] tokens.
    idx_tk: [T, K] int expert ids; ids outside [0, E) (e.g. E for padding) are not routed.
    w_tk: [T, K] combine weights (differentiable).
    w_gate_edf, w_up_edf: [E, D, F]; w_down_efd: [E, F, D].
    backend: 'auto' | 'ragged' | 'capacity' | 'dense'.
    capacity_factor: capacity backend only; 0 = dropless.
    expected_load: assignments per expert under balanced routing, which scales the dropless
      capacity ladders (default T * K / E; expert parallelism passes its own).
    dtype: compute dtype of the expert matmuls (default: x's); the combine is fp32.
  Returns:
    (y_td float32 [T, D], dropped int32 scalar: assignments dropped for capacity).
  """
  backend = resolve_backend(backend)
  dtype = dtype or x_td.dtype
  t, k = idx_tk.shape
  e = w_gate_edf.shape[0]
  x_td = x_td.astype(dtype)
  w_gate_edf, w_up_edf, w_down_efd = (w.astype(dtype) for w in (w_gate_edf, w_up_edf, w_down_efd))
  idx_a = idx_tk.reshape(-1).astype(jnp.int32)

  if backend == 'dense':
    onehot_tke = jax.nn.one_hot(idx_tk, e, dtype=jnp.float32)   # out-of-range -> zero row
    combine_te = jnp.einsum('tke,tk->te', onehot_tke, w_tk.astype(jnp.float32))
    y_ted = _swiglu(x_td, w_gate_edf, w_up_edf, w_down_efd, 'td,edf->tef', 'tef,efd->ted')
    return jnp.einsum('ted,te->td', y_ted.astype(jnp.float32), combine_te), jnp.int32(0)

  if backend == 'ragged':
    plan = plan_ragged(idx_a, e, k)
    x_rd = _dispatch(x_td, plan, k)
    g = jax.lax.ragged_dot(x_rd, w_gate_edf, plan.group_e)
    u = jax.lax.ragged_dot(x_rd, w_up_edf, plan.group_e)
    y_rd = jax.lax.ragged_dot(jax.nn.silu(g) * u, w_down_efd, plan.group_e)
    return _combine(y_rd, plan, w_tk), plan.dropped

  capacity = capacity_per_expert(t, k, e, capacity_factor) if capacity_factor > 0 else 0
  y_ad, dropped = capacity_expert_outputs(
      x_td, idx_a, k, (w_gate_edf, w_up_edf, w_down_efd), capacity=capacity,
      expected_load=expected_load)
  y_tkd = y_ad.reshape(t, k, -1).astype(jnp.float32)
  return jnp.einsum('tkd,tk->td', y_tkd, w_tk.astype(jnp.float32)), dropped
