"""Expert-major row layouts for MoE dispatch: integer plans and a gather whose transpose is a gather.

A plan says, for the A = T * K (token, expert) assignments of a batch, which row of an
expert-major buffer each one occupies (``slot_a``) and, for each buffer row, which token and
assignment it holds (``token_r``, ``assign_r``), so both directions of the data movement are
row gathers. Ids outside [0, E) (padding) are never placed.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


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
  dropped: int32 number of routed assignments that did not fit.
  """
  slot_a: jax.Array
  token_r: jax.Array
  assign_r: jax.Array
  group_e: jax.Array
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


def _finish(slot_a, rows: int, top_k: int, group_e, dropped) -> Plan:
  a = slot_a.shape[0]
  assign = jnp.arange(a, dtype=jnp.int32)
  assign_r = jnp.full((rows,), a, jnp.int32).at[slot_a].set(assign, mode='drop',
                                                            unique_indices=True)
  token_r = jnp.where(assign_r < a, assign_r // top_k, a // top_k)
  return Plan(slot_a, token_r, assign_r, group_e, jnp.asarray(dropped, jnp.int32))


def _clean(expert_a, num_experts: int):
  """Maps every unrouted id to E; returns (expert_a, valid_a)."""
  valid = (expert_a >= 0) & (expert_a < num_experts)
  return jnp.where(valid, expert_a, num_experts), valid


def plan_capacity(expert_a, num_experts: int, top_k: int, capacity: int, ranks=None) -> Plan:
  """[E, C] layout: assignment -> row e * C + rank, dropped when rank >= C.

  ranks: optional precomputed ``_rank_within_expert`` of the cleaned ids (shared by branches).
  """
  expert_a, valid = _clean(expert_a, num_experts)
  rank_a, _ = ranks if ranks is not None else _rank_within_expert(expert_a, num_experts)
  rows = num_experts * capacity
  keep = valid & (rank_a < capacity)
  slot_a = jnp.where(keep, expert_a * capacity + rank_a, rows)
  dropped = jnp.sum(valid & ~keep)
  return _finish(slot_a, rows, top_k, jnp.zeros((num_experts,), jnp.int32), dropped)


def plan_ragged(expert_a, num_experts: int, top_k: int) -> Plan:
  """Sorted layout: rows grouped by expert (group sizes for ragged_dot), unrouted rows last."""
  expert_a, valid = _clean(expert_a, num_experts)
  rank_a, counts = _rank_within_expert(expert_a, num_experts)
  starts = jnp.cumsum(counts) - counts
  a = expert_a.shape[0]
  slot_a = jnp.where(valid, starts[expert_a] + rank_a, a)
  return _finish(slot_a, a, top_k, counts[:num_experts], 0)
