"""The CPU expert backend: expert-major ``[E, C, D]`` buffers and one batched einsum per matmul.

Cost follows the active experts: about T * K rows whatever E, so 64 small experts cost about
what 8 do (computing every expert, or XLA CPU's ``ragged_dot``, costs E / K times more).

- Fixed capacity (``capacity_factor > 0``): C = ceil(capacity_factor * T * K / E); assignments
  past an expert's C are dropped (output zero) and counted by the caller.
- Dropless (``capacity_factor == 0``): experts are sorted by load at run time and split at
  sorted positions (``group_starts``): the busiest E / 8 form a 'hot' group, the rest a 'cold'
  group, itself split at E / 2 when E >= 32 (one group when E < 16). Each group gets its own
  ``[E_g, C_g, D]`` buffer whose C_g is picked with ``lax.switch`` from a ladder of static sizes
  (``HOT_LADDER`` / ``COLD_LADDER`` x the balanced load T * K / E) as the smallest that holds
  the group's busiest expert. Sorting bounds the busiest expert of a group starting at sorted
  position s by A / (s + 1), so each ladder ends at that bound and nothing is ever dropped. A
  skewed router (common at initialization) then costs about sum_g E_g x (the group's top
  load) instead of E x the top load.

Gradients. Differentiating a ``lax.switch`` makes every branch's residuals outputs of the
switch (zero-filled for the branches not taken), which costs more than the matmuls here. So the
expert computation has a hand-written VJP whose residuals do not depend on the branch: the
gate/up activations stored per assignment ([A, F], in token order); the backward pass runs
its own switch per group that re-gathers them into the same layout.

Returns per-assignment expert outputs y_ad [A, D] (row t * K + k; zero for unrouted or dropped
assignments); the caller combines them with the routing weights in fp32.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from kimi_vl_jax.ops.moe_layout import _clean, _rank_within_expert, _take_rows, plan_capacity
from kimi_vl_jax.parallel.vma import varying_axes

# Dropless capacities tried, as multiples of the balanced load T * K / E. The first group
# holds the busiest expert, never below the mean; the hot group's ladder is coarse (it has only
# E / 8 experts), the cold group's fine. Each ladder is cut at, and closed by, the bound that
# always fits. (Every rung is a compiled branch: about a second of compile time each on CPU.)
HOT_LADDER = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0)
COLD_LADDER = (0.75, 0.875, 1.0, 1.0625, 1.125, 1.25, 1.5, 2.0, 2.5, 3.0)


def group_starts(num_experts: int) -> tuple[int, ...]:
  """Sorted positions where expert groups start, plus E.

  (0, E/8, E/2, E) for E >= 32, (0, E/8, E) for E >= 16, else (0, E). A group costs a switch
  (~2-3 s more compile per program on CPU) and smaller matmuls, and saves padding when loads
  are skewed. Measured train steps, routers at init: 64 experts (``bench`` preset, loads up to
  3x the mean) 641-661 ms vs 674-692 ms with two groups; 16 experts (``small``) only 447-454
  vs 453-461 ms, which the short runs that use it (the demo, tests) do not win back in compile
  time, so 16 experts keep two groups.
  """
  e = num_experts
  if e >= 32:
    return (0, e // 8, e // 2, e)
  if e >= 16:
    return (0, e // 8, e)
  return (0, e)


def group_capacities(num_tokens: int, num_assignments: int, num_experts: int,
                     expected_load: float, multiple: int = 8):
  """Per group (experts sorted by load): its static capacity ladder.

  A group starting at sorted position s has as its busiest expert the (s + 1)-th busiest
  overall, whose load is at most min(T, A / (s + 1)); that bound closes the ladder.
  """
  starts = group_starts(num_experts)
  ladders = []
  for start in starts[:-1]:
    bound = max(1, min(num_tokens, num_assignments // (start + 1)))
    if start > 0:
      factors = COLD_LADDER
    elif len(starts) > 2:
      factors = HOT_LADDER
    else:
      factors = [f for f in COLD_LADDER if f >= 1.0]
    caps = {min(bound, multiple * math.ceil(f * expected_load / multiple)) for f in factors}
    ladders.append(tuple(sorted({c for c in caps if c > 0} | {bound})))
  return tuple(ladders)


def _match_vma(ct, like):
  """Gives a cotangent the same varying-manual-axes type as its primal (inside shard_map).

  A weight replicated over data-parallel axes gets a per-device gradient from the local tokens;
  the transpose of that implicit broadcast is a psum over those axes.
  """
  have, want = varying_axes(ct), varying_axes(like)
  if have - want:
    ct = jax.lax.psum(ct, tuple(sorted(have - want)))
  if want - have:
    ct = jax.lax.pcast(ct, tuple(sorted(want - have)), to='varying')
  return ct


def _matched(x_td, weights, dx, dws):
  return (_match_vma(dx, x_td),) + tuple(_match_vma(d, w) for d, w in zip(dws, weights))


def _silu_parts(g):
  sig = jax.nn.sigmoid(g)
  return g * sig, sig


# --- one rung: fixed capacity C -------------------------------------------------------------

def _rung_forward(c, x_td, weights, expert_a, ranks, *, top_k):
  """Expert outputs and the gate/up activations, all per assignment ([A, .])."""
  w_gate, w_up, w_down = weights
  e, d, f = w_gate.shape
  plan = plan_capacity(expert_a, e, top_k, c, ranks)
  x_ecd = _take_rows(x_td, plan.token_r).reshape(e, c, d)
  g_ecf = jnp.einsum('ecd,edf->ecf', x_ecd, w_gate)
  u_ecf = jnp.einsum('ecd,edf->ecf', x_ecd, w_up)
  y_ecd = jnp.einsum('ecf,efd->ecd', _silu_parts(g_ecf)[0] * u_ecf, w_down)
  per_assignment = lambda v, n: _take_rows(v.reshape(e * c, n), plan.slot_a)
  return per_assignment(y_ecd, d), per_assignment(g_ecf, f), per_assignment(u_ecf, f)


def _rung_backward(c, x_td, weights, expert_a, ranks, g_af, u_af, dy_ad, *, top_k):
  w_gate, w_up, w_down = weights
  e, d, f = w_gate.shape
  t = x_td.shape[0]
  plan = plan_capacity(expert_a, e, top_k, c, ranks)
  x_ecd = _take_rows(x_td, plan.token_r).reshape(e, c, d)
  rows = lambda v, n: _take_rows(v, plan.assign_r).reshape(e, c, n)
  g, u, dy = rows(g_af, f), rows(u_af, f), rows(dy_ad, d)
  act, sig = _silu_parts(g)
  d_w_down = jnp.einsum('ecf,ecd->efd', act * u, dy)
  dh = jnp.einsum('ecd,efd->ecf', dy, w_down)
  du = dh * act
  dg = dh * u * (sig * (1 + g * (1 - sig)))
  d_w_gate = jnp.einsum('ecd,ecf->edf', x_ecd, dg)
  d_w_up = jnp.einsum('ecd,ecf->edf', x_ecd, du)
  dx_ecd = jnp.einsum('ecf,edf->ecd', dg, w_gate) + jnp.einsum('ecf,edf->ecd', du, w_up)
  dx_tkd = _take_rows(dx_ecd.reshape(e * c, d), plan.slot_a).reshape(t, top_k, d)
  return dx_tkd.sum(axis=1), d_w_gate, d_w_up, d_w_down


# --- expert groups with a branch-independent VJP -------------------------------------------

def _group_ids(expert_a, pos_e, start: int, stop: int, num_experts: int):
  """Local expert ids (0..n-1) of the group's assignments (sorted positions [start, stop));
  n = stop - start for everything else."""
  pos_a = jnp.take(pos_e, jnp.minimum(expert_a, num_experts - 1))
  mine = (expert_a < num_experts) & (pos_a >= start) & (pos_a < stop)
  return jnp.where(mine, pos_a - start, stop - start)


def _group_view(weights, order_e, pos_e, expert_a, g: int, starts):
  """(expert ids, weights) of group g; the identity when there is a single group."""
  e = weights[0].shape[0]
  if len(starts) == 2:
    return expert_a, weights
  start, stop = starts[g], starts[g + 1]
  ws = tuple(jnp.take(w, order_e[start:stop], axis=0) for w in weights)
  return _group_ids(expert_a, pos_e, start, stop, e), ws


def _starts(ladders, weights):
  e = weights[0].shape[0]
  return group_starts(e) if len(ladders) > 1 else (0, e)


def _forward(ladders, top_k, choice_g, order_e, pos_e, x_td, weights, expert_a, ranks):
  starts = _starts(ladders, weights)
  total = None
  for g, caps in enumerate(ladders):
    ids, ws = _group_view(weights, order_e, pos_e, expert_a, g, starts)
    branches = [functools.partial(_rung_forward, c, top_k=top_k) for c in caps]
    out = jax.lax.switch(choice_g[g], branches, x_td, ws, ids, ranks)
    # Groups hold disjoint assignments (zero elsewhere), so their outputs add.
    total = out if total is None else tuple(a + b for a, b in zip(total, out))
  return total


def _backward(ladders, top_k, choice_g, order_e, pos_e, x_td, weights, expert_a, ranks,
              g_af, u_af, dy_ad):
  starts = _starts(ladders, weights)
  dx, dws = None, []
  for g, caps in enumerate(ladders):
    ids, ws = _group_view(weights, order_e, pos_e, expert_a, g, starts)
    branches = [functools.partial(_rung_backward, c, top_k=top_k) for c in caps]
    dx_g, *dw_g = jax.lax.switch(choice_g[g], branches, x_td, ws, ids, ranks, g_af, u_af, dy_ad)
    dx = dx_g if dx is None else dx + dx_g
    dws.append(dw_g)
  # Group weight gradients are in load order; pos_e puts each expert back (a gather).
  dws = [jnp.concatenate([d[i] for d in dws], axis=0) for i in range(3)]
  if len(starts) > 2:
    dws = [jnp.take(d, pos_e, axis=0) for d in dws]
  return _matched(x_td, weights, dx, dws)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _expert_outputs(ladders, top_k, choice_g, order_e, pos_e, x_td, weights, expert_a, ranks):
  return _forward(ladders, top_k, choice_g, order_e, pos_e, x_td, weights, expert_a, ranks)[0]


def _expert_outputs_fwd(ladders, top_k, choice_g, order_e, pos_e, x_td, weights, expert_a, ranks):
  y, g, u = _forward(ladders, top_k, choice_g, order_e, pos_e, x_td, weights, expert_a, ranks)
  return y, (choice_g, order_e, pos_e, x_td, weights, expert_a, ranks, g, u)


def _expert_outputs_bwd(ladders, top_k, res, dy_ad):
  choice_g, order_e, pos_e, x_td, weights, expert_a, ranks, g_af, u_af = res
  dx, *dws = _backward(ladders, top_k, choice_g, order_e, pos_e, x_td, weights, expert_a, ranks,
                       g_af, u_af, dy_ad.astype(x_td.dtype))
  return None, None, None, dx, tuple(dws), None, None


_expert_outputs.defvjp(_expert_outputs_fwd, _expert_outputs_bwd)


def capacity_expert_outputs(x_td, idx_a, top_k: int, weights, *, capacity: int = 0,
                            expected_load: float | None = None):
  """Per-assignment expert outputs with the capacity layout.

  Args:
    x_td: [T, D]; idx_a: [A = T * K] int expert ids (outside [0, E): unrouted).
    weights: (w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D]) in the compute dtype.
    capacity: C > 0 fixes the capacity (drops past it); 0 = dropless (grouped ladders).
    expected_load: balanced assignments per expert, which scales the ladders (default A / E).
  Returns:
    (y_ad [A, D] in the compute dtype, dropped int32 assignments past capacity).
  """
  t = x_td.shape[0]
  a = idx_a.shape[0]
  e = weights[0].shape[0]
  expert_a, valid = _clean(idx_a, e)
  ranks = _rank_within_expert(expert_a, e)
  counts_e = ranks[1][:e]
  if capacity > 0:
    ladders = ((capacity,),)
    choice_g = jnp.zeros((1,), jnp.int32)
    order_e = pos_e = jnp.arange(e, dtype=jnp.int32)
    dropped = jnp.sum(valid & (ranks[0] >= capacity)).astype(jnp.int32)
  else:
    ladders = group_capacities(t, a, e, expected_load or a / e)
    order_e = jnp.argsort(-counts_e, stable=True).astype(jnp.int32)      # busiest first
    pos_e = jnp.zeros((e,), jnp.int32).at[order_e].set(jnp.arange(e, dtype=jnp.int32))
    group_max = counts_e[order_e[jnp.asarray(group_starts(e)[:-1])]]     # busiest per group
    choice_g = jnp.stack([jnp.minimum(jnp.sum(jnp.asarray(caps) < group_max[g]), len(caps) - 1)
                          for g, caps in enumerate(ladders)]).astype(jnp.int32)
    dropped = jnp.int32(0)
  y_ad = _expert_outputs(ladders, top_k, choice_g, order_e, pos_e, x_td, tuple(weights),
                         expert_a, ranks)
  return y_ad, dropped
