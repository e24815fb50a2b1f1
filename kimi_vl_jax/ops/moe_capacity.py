"""The CPU expert backend: expert-major ``[E, C, D]`` buffers and one batched einsum per matmul.

Cost follows the active experts: E * C rows with C about T * K / E, so 64 small experts cost
about what 8 wider-loaded ones do (computing every expert, or XLA CPU's ``ragged_dot``, costs
E / K times more).

- Fixed capacity (``capacity_factor > 0``): C = ceil(capacity_factor * T * K / E); assignments
  past an expert's C are dropped (output zero) and counted by the caller.
- Dropless (``capacity_factor == 0``): C is picked at run time with ``lax.switch`` from a ladder
  of static sizes (``DROPLESS_LADDER`` x the balanced load) as the smallest that holds the
  busiest expert. When no rung is large enough (and no rung reaches C = T, which always fits)
  a block layout takes over: every expert's rows padded to a multiple of ``block`` rows, each
  block with a copy of its expert's weights, so at most T * K + E * (block - 1) rows.

Gradients. Differentiating a ``lax.switch`` makes every branch's residuals outputs of the
switch (zero-filled for the branches not taken), which costs more than the matmuls here. So the
expert computation has a hand-written VJP whose residuals do not depend on the branch: the
gate/up activations stored per assignment ([A, F], in token order); the backward pass runs
its own switch that re-gathers them into the same rung's layout.

Returns per-assignment expert outputs y_ad [A, D] (row t * K + k; zero for unrouted or dropped
assignments); the caller combines them with the routing weights in fp32.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from kimi_vl_jax.ops.moe_layout import (
    _clean, _rank_within_expert, _take_rows, plan_capacity, plan_dropless_blocks)

# Rows per block of the dropless fallback layout (each expert pads its rows to a multiple).
DROPLESS_BLOCK = 64
# Dropless capacities tried, as multiples of the balanced per-expert load T * K / E.
DROPLESS_LADDER = (1.0, 1.0625, 1.125, 1.1875, 1.25, 1.3125, 1.375, 1.5, 1.75, 2.0, 3.0)


def dropless_capacities(num_tokens: int, expected_load: float,
                        ladder=DROPLESS_LADDER, multiple: int = 8) -> tuple[int, ...]:
  """The static capacities of the dropless ladder (rounded up to ``multiple``, at most T)."""
  caps = {min(num_tokens, multiple * math.ceil(f * expected_load / multiple)) for f in ladder}
  return tuple(sorted(caps))


def _varying_axes(v) -> frozenset:
  """Mesh axes along which a value varies inside shard_map (empty outside)."""
  aval = jax.typeof(v)
  mat = getattr(aval, 'manual_axis_type', None)
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(aval, 'vma', ()))


def _match_vma(ct, like):
  """Gives a cotangent the same varying-manual-axes type as its primal (inside shard_map).

  A weight replicated over data-parallel axes gets a per-device gradient from the local tokens;
  the transpose of that implicit broadcast is a psum over those axes.
  """
  have, want = _varying_axes(ct), _varying_axes(like)
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

def _rung_forward(c, x_td, weights, expert_a, ranks, top_k):
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


def _rung_backward(c, x_td, weights, expert_a, ranks, top_k, g_af, u_af, dy_ad):
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


# --- fallback: block layout (any routing) ---------------------------------------------------

def _blocks_forward(block, x_td, weights, expert_a, ranks, top_k):
  e, d, f = weights[0].shape
  plan = plan_dropless_blocks(expert_a, e, top_k, block, ranks)
  nb = plan.block_expert_n.shape[0]
  x_nbd = _take_rows(x_td, plan.token_r).reshape(nb, block, d)
  w_gate, w_up, w_down = (jnp.take(w, plan.block_expert_n, axis=0) for w in weights)
  g = jnp.einsum('nbd,ndf->nbf', x_nbd, w_gate)
  u = jnp.einsum('nbd,ndf->nbf', x_nbd, w_up)
  y = jnp.einsum('nbf,nfd->nbd', _silu_parts(g)[0] * u, w_down)
  per_assignment = lambda v, n: _take_rows(v.reshape(nb * block, n), plan.slot_a)
  return per_assignment(y, d), per_assignment(g, f), per_assignment(u, f)


def _blocks_backward(block, x_td, weights, expert_a, ranks, top_k, g_af, u_af, dy_ad):
  e, d, f = weights[0].shape
  t = x_td.shape[0]
  plan = plan_dropless_blocks(expert_a, e, top_k, block, ranks)
  nb = plan.block_expert_n.shape[0]
  w_gate, w_up, w_down = (jnp.take(w, plan.block_expert_n, axis=0) for w in weights)
  x = _take_rows(x_td, plan.token_r).reshape(nb, block, d)
  rows = lambda v, n: _take_rows(v, plan.assign_r).reshape(nb, block, n)
  g, u, dy = rows(g_af, f), rows(u_af, f), rows(dy_ad, d)
  act, sig = _silu_parts(g)
  dh = jnp.einsum('nbd,nfd->nbf', dy, w_down)
  du = dh * act
  dg = dh * u * (sig * (1 + g * (1 - sig)))
  # Per-block weight gradients summed into their (sorted) experts.
  per_expert = lambda v: jax.ops.segment_sum(v, plan.block_expert_n, e, indices_are_sorted=True)
  d_w_down = per_expert(jnp.einsum('nbf,nbd->nfd', act * u, dy))
  d_w_gate = per_expert(jnp.einsum('nbd,nbf->ndf', x, dg))
  d_w_up = per_expert(jnp.einsum('nbd,nbf->ndf', x, du))
  dx = jnp.einsum('nbf,ndf->nbd', dg, w_gate) + jnp.einsum('nbf,ndf->nbd', du, w_up)
  dx_tkd = _take_rows(dx.reshape(nb * block, d), plan.slot_a).reshape(t, top_k, d)
  return dx_tkd.sum(axis=1), d_w_gate, d_w_up, d_w_down


# --- the switch with its VJP ----------------------------------------------------------------

def _branches(caps, block, top_k, num_tokens):
  """Forward and backward branch functions (static sizes bound; arrays as operands)."""
  def bind(fn, size):
    return lambda x, ws, ex, rk, *rest: fn(size, x, ws, ex, rk, top_k, *rest)
  fwd = [bind(_rung_forward, c) for c in caps]
  bwd = [bind(_rung_backward, c) for c in caps]
  if caps[-1] < num_tokens:   # C = T always fits (an expert sees a token at most once)
    fwd.append(bind(_blocks_forward, block))
    bwd.append(bind(_blocks_backward, block))
  return fwd, bwd


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _expert_outputs(caps, block, top_k, choice, x_td, weights, expert_a, ranks):
  fwd, _ = _branches(caps, block, top_k, x_td.shape[0])
  return jax.lax.switch(choice, fwd, x_td, weights, expert_a, ranks)[0]


def _expert_outputs_fwd(caps, block, top_k, choice, x_td, weights, expert_a, ranks):
  fwd, _ = _branches(caps, block, top_k, x_td.shape[0])
  y_ad, g_af, u_af = jax.lax.switch(choice, fwd, x_td, weights, expert_a, ranks)
  return y_ad, (choice, x_td, weights, expert_a, ranks, g_af, u_af)


def _expert_outputs_bwd(caps, block, top_k, res, dy_ad):
  choice, x_td, weights, expert_a, ranks, g_af, u_af = res
  _, bwd = _branches(caps, block, top_k, x_td.shape[0])
  dx, dwg, dwu, dwd = jax.lax.switch(choice, bwd, x_td, weights, expert_a, ranks,
                                     g_af, u_af, dy_ad.astype(x_td.dtype))
  dx, dwg, dwu, dwd = _matched(x_td, weights, dx, (dwg, dwu, dwd))
  return None, dx, (dwg, dwu, dwd), None, None


_expert_outputs.defvjp(_expert_outputs_fwd, _expert_outputs_bwd)


def capacity_expert_outputs(x_td, idx_a, top_k: int, weights, *, capacity: int = 0,
                            expected_load: float | None = None, block: int = DROPLESS_BLOCK):
  """Per-assignment expert outputs with the capacity layout.

  Args:
    x_td: [T, D]; idx_a: [A = T * K] int expert ids (outside [0, E): unrouted).
    weights: (w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D]) in the compute dtype.
    capacity: C > 0 fixes the capacity (drops past it); 0 = dropless ladder.
    expected_load: balanced assignments per expert scaling the ladder (default A / E).
  Returns:
    (y_ad [A, D] in the compute dtype, dropped int32 assignments past capacity).
  """
  t = x_td.shape[0]
  e = weights[0].shape[0]
  expert_a, valid = _clean(idx_a, e)
  ranks = _rank_within_expert(expert_a, e)
  if capacity > 0:
    caps = (capacity,)
    choice = jnp.int32(0)
    dropped = jnp.sum(valid & (ranks[0] >= capacity)).astype(jnp.int32)
  else:
    caps = dropless_capacities(t, expected_load or idx_a.shape[0] / e)
    n_branches = len(caps) + (caps[-1] < t)
    choice = jnp.minimum(jnp.sum(jnp.asarray(caps) < jnp.max(ranks[1][:e])), n_branches - 1)
    dropped = jnp.int32(0)
  y_ad = _expert_outputs(caps, block, top_k, choice.astype(jnp.int32), x_td, tuple(weights),
                         expert_a, ranks)
  return y_ad, dropped
