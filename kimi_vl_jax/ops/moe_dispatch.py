"""Routed-expert compute: tokens x top-k assignments -> sum_k w_k * Expert_{idx_k}(x).

One interface, ``expert_ffn``, several backends with the same result (up to capacity drops):

- ``dense``: every expert on every token, combined with one-hot weights. O(T * E) work; the
  test oracle.
- ``ragged``: sort the (token, expert) assignments by expert and run ``jax.lax.ragged_dot``
  (grouped GEMM). The TPU/GPU default. On CPU XLA lowers ragged_dot to roughly the cost of
  computing every expert, so it is not used there.
- ``capacity``: the CPU path, whose cost follows the active experts. Assignments are sorted by
  expert and gathered into expert-major buffers, then a batched einsum runs per expert.
  ``capacity_factor > 0``: an ``[E, C, D]`` buffer with
  ``C = ceil(capacity_factor * T * K / E)``; assignments past an expert's capacity are
  dropped (and counted). ``capacity_factor == 0``: dropless; each expert's rows are padded to a
  multiple of a row block and every block carries its expert's weights, so the buffer holds
  at most ``T * K + E * (block - 1)`` rows whatever the routing (no token is ever dropped).
- ``auto``: ``capacity`` on CPU, ``ragged`` elsewhere.

Every data movement (tokens -> buffer, buffer -> tokens) is a row gather with integer indices
whose backward pass is again a gather (``gather_rows``), never a one-hot matmul or a
scatter-add, because on CPU scatters and one-hot dispatch tensors dominate the step.

Shapes: T tokens, K = top-k, A = T * K assignments, E experts, D model width, F expert width.
Expert weights: ``w_gate_edf``, ``w_up_edf`` [E, D, F] and ``w_down_efd`` [E, F, D];
expert(x) = down(silu(x @ gate) * (x @ up)). An expert index equal to E (or any index outside
[0, E)) marks an assignment that is not routed (padding tokens); it contributes nothing.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

BACKENDS = ('auto', 'ragged', 'capacity', 'dense')

# Rows per block of the dropless capacity layout (each expert pads its rows to a multiple).
DROPLESS_BLOCK = 64


def resolve_backend(backend: str) -> str:
  """'auto' -> 'capacity' on CPU, 'ragged' on accelerators; other names pass through."""
  if backend not in BACKENDS:
    raise ValueError(f'moe_backend must be one of {", ".join(BACKENDS)}; got {backend!r}')
  if backend == 'auto':
    return 'capacity' if jax.default_backend() == 'cpu' else 'ragged'
  return backend


def capacity_per_expert(num_tokens: int, top_k: int, num_experts: int,
                        capacity_factor: float) -> int:
  """C = ceil(capacity_factor * T * K / E), at least 1; 0 means dropless (C = T)."""
  if capacity_factor < 0:
    raise ValueError(f'moe_capacity_factor must be >= 0, got {capacity_factor}')
  if capacity_factor == 0:
    return num_tokens
  return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


# --------------------------------------------------------------------------------------------
# Row gather whose transpose is a gather.
# --------------------------------------------------------------------------------------------

def _take_rows(x_nd, idx_m):
  """x_nd[idx_m] with out-of-range indices giving zero rows."""
  return jnp.take(x_nd, idx_m, axis=0, mode='fill', fill_value=0)


@jax.custom_vjp
def gather_rows(x_nd, idx_m, inv_nk):
  """out[m] = x[idx[m]] (zero where idx[m] is out of range).

  ``inv_nk`` is the inverse map: row n of x is read by the output rows inv[n, :] (out-of-range
  entries = unused slots). Every (m, idx[m]) pair must appear in inv and vice versa. The
  backward pass is then dx[n] = sum_k dout[inv[n, k]], a gather, instead of a scatter-add.
  """
  del inv_nk
  return _take_rows(x_nd, idx_m)


def _gather_rows_fwd(x_nd, idx_m, inv_nk):
  return _take_rows(x_nd, idx_m), (idx_m, inv_nk)


def _gather_rows_bwd(res, g_md):
  idx_m, inv_nk = res
  n, k = inv_nk.shape
  dx = _take_rows(g_md, inv_nk.reshape(-1)).reshape(n, k, g_md.shape[-1])
  dx = dx[:, 0] if k == 1 else dx.sum(axis=1)
  return dx, None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


# --------------------------------------------------------------------------------------------
# Layout plans (integer bookkeeping, no gradients).
# --------------------------------------------------------------------------------------------

class Plan(NamedTuple):
  """Where each assignment lives in the expert-major row buffer.

  slot_a: [A] buffer row of assignment a (= rows for dropped/unrouted ones).
  token_r: [R] token read by buffer row r (= T for empty rows).
  assign_r: [R] assignment held by buffer row r (= A for empty rows).
  group_e: [E] rows per expert (ragged layout only; zeros otherwise).
  block_expert_n: [R // block] expert of each row block (dropless layout only).
  dropped: int32 number of routed assignments that did not fit.
  """
  slot_a: jax.Array
  token_r: jax.Array
  assign_r: jax.Array
  group_e: jax.Array
  block_expert_n: jax.Array
  dropped: jax.Array


def _rank_within_expert(expert_a, num_experts: int):
  """Stable rank of each assignment among those of its expert, and per-expert counts [E+1]."""
  a = expert_a.shape[0]
  order = jnp.argsort(expert_a, stable=True)
  counts = jnp.zeros((num_experts + 1,), jnp.int32).at[expert_a].add(1)
  starts = jnp.cumsum(counts) - counts
  rank_sorted = jnp.arange(a, dtype=jnp.int32) - starts[expert_a[order]]
  rank_a = jnp.zeros((a,), jnp.int32).at[order].set(rank_sorted, unique_indices=True)
  return rank_a, counts


def _finish(slot_a, rows: int, top_k: int, group_e, block_expert_n, dropped) -> Plan:
  a = slot_a.shape[0]
  assign = jnp.arange(a, dtype=jnp.int32)
  assign_r = jnp.full((rows,), a, jnp.int32).at[slot_a].set(assign, mode='drop',
                                                            unique_indices=True)
  token_r = jnp.where(assign_r < a, assign_r // top_k, a // top_k)
  return Plan(slot_a, token_r, assign_r, group_e, block_expert_n, jnp.asarray(dropped, jnp.int32))


def plan_capacity(expert_a, num_experts: int, top_k: int, capacity: int) -> Plan:
  """[E, C] layout: assignment -> row e * C + rank, dropped when rank >= C."""
  valid = (expert_a >= 0) & (expert_a < num_experts)
  expert_a = jnp.where(valid, expert_a, num_experts)
  rank_a, _ = _rank_within_expert(expert_a, num_experts)
  rows = num_experts * capacity
  keep = valid & (rank_a < capacity)
  slot_a = jnp.where(keep, expert_a * capacity + rank_a, rows)
  dropped = jnp.sum(valid & ~keep)
  return _finish(slot_a, rows, top_k, jnp.zeros((num_experts,), jnp.int32),
                 jnp.zeros((0,), jnp.int32), dropped)


def dropless_blocks(num_assignments: int, num_experts: int, block: int) -> int:
  """Static bound on row blocks: sum_e ceil(c_e / b) <= (A + E (b - 1)) / b."""
  return (num_assignments + num_experts * (block - 1)) // block


def plan_dropless_blocks(expert_a, num_experts: int, top_k: int, block: int) -> Plan:
  """Each expert's rows padded to a multiple of ``block``; no capacity, nothing dropped."""
  valid = (expert_a >= 0) & (expert_a < num_experts)
  expert_a = jnp.where(valid, expert_a, num_experts)
  rank_a, counts = _rank_within_expert(expert_a, num_experts)
  blocks_e = (counts[:num_experts] + block - 1) // block
  end_blocks_e = jnp.cumsum(blocks_e)
  start_row_e = jnp.concatenate([jnp.zeros((1,), jnp.int32), end_blocks_e[:-1] * block,
                                 jnp.zeros((1,), jnp.int32)])
  nb = dropless_blocks(expert_a.shape[0], num_experts, block)
  rows = nb * block
  slot_a = jnp.where(valid, start_row_e[expert_a] + rank_a, rows)
  # Blocks past the last used one get the last expert: their rows are zero, so they add
  # nothing to outputs or weight gradients.
  block_expert_n = jnp.minimum(
      jnp.searchsorted(end_blocks_e, jnp.arange(nb, dtype=jnp.int32), side='right'),
      num_experts - 1).astype(jnp.int32)
  return _finish(slot_a, rows, top_k, jnp.zeros((num_experts,), jnp.int32), block_expert_n, 0)


def plan_ragged(expert_a, num_experts: int, top_k: int) -> Plan:
  """Sorted layout: rows grouped by expert (group sizes for ragged_dot), unrouted rows last."""
  valid = (expert_a >= 0) & (expert_a < num_experts)
  expert_a = jnp.where(valid, expert_a, num_experts)
  rank_a, counts = _rank_within_expert(expert_a, num_experts)
  starts = jnp.cumsum(counts) - counts
  a = expert_a.shape[0]
  slot_a = jnp.where(valid, starts[expert_a] + rank_a, a)
  return _finish(slot_a, a, top_k, counts[:num_experts], jnp.zeros((0,), jnp.int32), 0)


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
               capacity_factor: float = 0.0, dtype=None, block: int = DROPLESS_BLOCK):
  """Weighted sum of the top-k routed experts of every token.

  Args:
    x_td: [T, D] tokens.
    idx_tk: [T, K] int expert ids; ids outside [0, E) (e.g. E for padding) are not routed.
    w_tk: [T, K] combine weights (differentiable).
    w_gate_edf, w_up_edf: [E, D, F]; w_down_efd: [E, F, D].
    backend: 'auto' | 'ragged' | 'capacity' | 'dense'.
    capacity_factor: capacity backend only; 0 = dropless.
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

  if capacity_factor > 0:
    c = capacity_per_expert(t, k, e, capacity_factor)
    plan = plan_capacity(idx_a, e, k, c)
    x_ecd = _dispatch(x_td, plan, k).reshape(e, c, -1)
    y_ecd = _swiglu(x_ecd, w_gate_edf, w_up_edf, w_down_efd, 'ecd,edf->ecf', 'ecf,efd->ecd')
    return _combine(y_ecd.reshape(e * c, -1), plan, w_tk), plan.dropped

  plan = plan_dropless_blocks(idx_a, e, k, block)
  nb = plan.block_expert_n.shape[0]
  x_nbd = _dispatch(x_td, plan, k).reshape(nb, block, -1)
  wg, wu, wd = (jnp.take(w, plan.block_expert_n, axis=0)
                for w in (w_gate_edf, w_up_edf, w_down_efd))
  y_nbd = _swiglu(x_nbd, wg, wu, wd, 'nbd,ndf->nbf', 'nbf,nfd->nbd')
  return _combine(y_nbd.reshape(nb * block, -1), plan, w_tk), plan.dropped
