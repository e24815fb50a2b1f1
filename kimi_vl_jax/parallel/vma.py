"""Varying-manual-axes (vma) bookkeeping for code that may run inside ``jax.shard_map``.

Inside ``shard_map`` (check_vma on, the default) every value's type records the mesh axes it
varies along; a loop's carry must keep its type, and a cotangent must match its primal's.
Constants built with ``jnp.zeros``/``jnp.full`` vary along nothing, so a loop carry started
from one and updated with per-device data fails to trace. Outside ``shard_map`` these are
no-ops.
"""
from __future__ import annotations

import jax


def varying_axes(v) -> frozenset:
  """Mesh axes along which a value varies inside shard_map (empty outside)."""
  aval = jax.typeof(v)
  mat = getattr(aval, 'manual_axis_type', None)
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(aval, 'vma', ()))


def vary_like(x, *refs):
  """``x`` marked as varying along every axis that any of ``refs`` varies along."""
  want = frozenset().union(*(varying_axes(r) for r in refs)) - varying_axes(x)
  if not want:
    return x
  return jax.lax.pcast(x, tuple(sorted(want)), to='varying')
