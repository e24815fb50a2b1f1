"""ZeRO-1 on a JAX mesh: optimizer state sharded over the devices, Muon per Moonlight Alg. 1.

Every optimizer buffer (Muon momentum, Adam moments) is sharded over ALL mesh axes it can
be split on, also the data-parallel axes over which its parameter is replicated, so state
memory per device is ~1/N. A parameter's sharding is ``pp`` (from the logical rules); its
state's is ``ps`` = ``pp`` plus extra mesh axes appended (minor) to some dimensions.

A Muon parameter is updated inside one ``jax.shard_map`` in one of two modes:

- ``gather`` (a 2-D matrix, or a stack whose batch axes cannot take the mesh axes that
  split its matrices): the state
  holds a slice of each matrix; the Nesterov direction is all-gathered ONCE over every mesh
  axis that splits the matrix axes (in ``ns_dtype``, bf16 by option), Newton-Schulz runs on
  the full matrix (redundantly on each device of the group, as in Moonlight), and each
  device keeps its ``pp`` slice via ``axis_index``, so no second gather is needed for the
  update. GSPMD would instead communicate at every NS step (SPEC §4.2).
- ``local`` (stacks of layers/experts whose batch axes can take every mesh axis that splits
  the matrix): the state holds whole matrices; the gradient moves to that layout with
  ``all_to_all`` (matrix axis <-> batch axis) and slicing, NS runs on whole local matrices,
  and the update moves back by ``all_to_all``. The only all-gather is ZeRO-1's usual one
  over axes the parameter is replicated on (none when the stack is sharded over the whole
  mesh); a replicated axis that does not fit on the batch axes shards the state's matrix
  axes instead and is gathered once before NS.

The gradient is resharded to its ZeRO-1 layout before the ``shard_map`` (ps in gather mode,
pp plus the batch-dim extras in local mode), so the partitioner can turn the data-parallel
gradient all-reduce plus slice into a reduce-scatter (Moonlight step 1) where the platform's
XLA pipeline does that (GPU/TPU; the CPU pipeline keeps an all-reduce).

A spec is handled here in canonical form: a tuple (one entry per dimension) of tuples of
mesh axis names, major to minor.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kimi_vl_jax.optim import muon as muon_math
from kimi_vl_jax.optim.routes import Route

Canon = tuple[tuple[str, ...], ...]


def canon(spec: Optional[P], ndim: int) -> Canon:
  entries = tuple(spec) if spec is not None else ()
  entries = entries + (None,) * (ndim - len(entries))
  return tuple(() if e is None else ((e,) if isinstance(e, str) else tuple(e)) for e in entries)


def to_pspec(c: Canon) -> P:
  return P(*[None if not axes else (axes[0] if len(axes) == 1 else axes) for axes in c])


def _local_size(shape, c: Canon, mesh: Mesh, dim: int) -> int:
  return shape[dim] // math.prod(mesh.shape[a] for a in c[dim])


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """How one parameter is updated on the mesh (see the module docstring)."""
  route: Route
  pp: Canon                                   # parameter sharding
  ps: Canon                                   # state sharding
  mode: str = 'none'                          # 'gather' | 'local' | 'none' (not Muon)
  a2a: tuple[tuple[str, int, int], ...] = ()  # local mode: (axis, matrix dim, batch dim)
  slices: tuple[tuple[str, int], ...] = ()    # local mode: unused axes put on matrix dims
  gather_axes: tuple[str, ...] = ()           # axes splitting matrix dims in ps (gathered)
  pre: Canon = ()                             # the gradient's layout entering shard_map
  gather_back: tuple[tuple[str, int], ...] = ()  # local mode: unused axes on batch dims

  @property
  def grad_spec(self) -> P:
    return to_pspec(self.pre)

  @property
  def param_spec(self) -> P:
    return to_pspec(self.pp)

  @property
  def state_spec(self) -> P:
    return to_pspec(self.ps)


def _place(shape, axes_by_dim: list, axis: str, dims, mesh: Mesh) -> Optional[int]:
  """The dim (among dims) with the largest local size that ``axis`` divides; None if none."""
  best = None
  for d in dims:
    local = shape[d] // math.prod(mesh.shape[a] for a in axes_by_dim[d])
    if local % mesh.shape[axis] == 0 and (best is None or local > best[1]):
      best = (d, local)
  return None if best is None else best[0]


def _extras(pp: Canon, mesh: Mesh) -> list[str]:
  used = {a for axes in pp for a in axes}
  return [a for a in mesh.axis_names if mesh.shape[a] > 1 and a not in used]


def plan_adam(route: Route, pp: Canon, mesh: Mesh) -> LeafPlan:
  """AdamW / frozen state: pp plus the unused axes appended where they divide."""
  shape = route.shape
  axes = [list(a) for a in pp]
  for axis in _extras(pp, mesh):
    d = _place(shape, axes, axis, range(len(shape)), mesh)
    if d is not None:
      axes[d].append(axis)
  return LeafPlan(route, pp, tuple(tuple(a) for a in axes))


def plan_muon(route: Route, pp: Canon, mesh: Mesh) -> LeafPlan:
  shape = route.shape
  matrix_dims = route.reduction + route.output
  extras = _extras(pp, mesh)
  if route.batch:
    # Local mode: every axis on a matrix dim moves to a batch dim (minor-first per dim, so
    # each all_to_all concatenates contiguous blocks), then the unused axes are added.
    axes = [list(a) for a in pp]   # bookkeeping of what each dim holds (for divisibility)
    a2a, ok = [], True
    for dm in matrix_dims:
      for axis in reversed(pp[dm]):
        db = _place(shape, axes, axis, route.batch, mesh)
        if db is None:
          ok = False
          break
        axes[db].append(axis)
        axes[dm].remove(axis)
        a2a.append((axis, dm, db))
      if not ok:
        break
    batch_extras, matrix_extras = [], []
    for axis in extras if ok else ():
      # An unused axis goes on a batch dim if it fits; else on a matrix dim, gathered once
      # before NS (the param is replicated over it, so no slicing back); else replicated.
      d = _place(shape, axes, axis, route.batch, mesh)
      if d is not None:
        batch_extras.append((axis, d))
      else:
        d = _place(shape, axes, axis, matrix_dims, mesh)
        if d is None:
          continue
        matrix_extras.append((axis, d))
      axes[d].append(axis)
    if ok:
      # The gradient enters as pp + batch extras (a plain reshard: GSPMD can reduce-scatter
      # it); the all_to_alls then append the moved axes (minor) to the batch dims.
      pre = [list(a) for a in pp]
      for axis, d in batch_extras:
        pre[d].append(axis)
      ps = [list(a) for a in pre]
      for axis, dm, db in a2a:
        ps[db].append(axis)
        ps[dm].remove(axis)
      for axis, d in matrix_extras:
        ps[d].append(axis)
      ps = tuple(tuple(a) for a in ps)
      gather_axes = tuple(a for d in range(len(shape)) if d in matrix_dims for a in ps[d])
      return LeafPlan(route, pp, ps, 'local', tuple(a2a), tuple(matrix_extras), gather_axes,
                      tuple(tuple(a) for a in pre), tuple(batch_extras))
  # Gather mode: unused axes go on the matrix dims only (batch dims keep pp), so the one
  # gather over the matrix axes yields exactly the rows/columns this device's pp needs.
  # The gradient enters already in ps (a reshard outside: GSPMD can reduce-scatter it).
  axes = [list(a) for a in pp]
  for axis in extras:
    d = _place(shape, axes, axis, matrix_dims, mesh)
    if d is not None:
      axes[d].append(axis)
  ps = tuple(tuple(a) for a in axes)
  gather_axes = tuple(a for d in range(len(shape)) if d in matrix_dims for a in ps[d])
  return LeafPlan(route, pp, ps, 'gather', gather_axes=gather_axes, pre=ps)


def plan_leaf(route: Route, pp: Canon, mesh: Mesh) -> LeafPlan:
  if route.treatment == 'muon':
    return plan_muon(route, pp, mesh)
  return plan_adam(route, pp, mesh)


def _linear_index(axes, mesh: Mesh):
  idx = 0
  for a in axes:
    idx = idx * mesh.shape[a] + jax.lax.axis_index(a)
  return idx


def _slice_axis(x, axis: str, dim: int, mesh: Mesh):
  size = x.shape[dim] // mesh.shape[axis]
  return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(axis) * size, size, dim)


def _gather_full(x, plan: LeafPlan, mesh: Mesh):
  """One all-gather over ``plan.gather_axes``, reassembled into full matrix dims."""
  if not plan.gather_axes:
    return x
  stacked = jax.lax.all_gather(x, plan.gather_axes, axis=0, tiled=False)
  sizes = [mesh.shape[a] for a in plan.gather_axes]
  stacked = stacked.reshape(tuple(sizes) + x.shape)
  k, perm, pos = len(sizes), [], 0
  for d, axes in enumerate(plan.ps):
    if d in plan.route.reduction + plan.route.output:
      perm.extend(range(pos, pos + len(axes)))
      pos += len(axes)
    perm.append(k + d)
  full_shape = tuple(x.shape[d] * (math.prod(mesh.shape[a] for a in plan.ps[d])
                                   if d in plan.route.reduction + plan.route.output else 1)
                     for d in range(x.ndim))
  return jnp.transpose(stacked, perm).reshape(full_shape)


def muon_leaf_update(grad, mom, plan: LeafPlan, mesh: Mesh, *, momentum: float, ns_steps: int,
                     ns_dtype) -> tuple[jax.Array, jax.Array]:
  """(NS of the Nesterov momentum in pp, unscaled; new momentum in ps) for one Muon parameter."""
  r = plan.route

  def body(g, m):   # g: the pre block, m: the ps block
    x = g.astype(jnp.float32)
    for axis, dm, db in plan.a2a:
      x = jax.lax.all_to_all(x, axis, db, dm, tiled=True)
    for axis, d in plan.slices:
      x = _slice_axis(x, axis, d, mesh)
    n, m = muon_math.nesterov_momentum(x, m, momentum)
    if plan.gather_axes:
      n = _gather_full(n.astype(ns_dtype), plan, mesh)
    u = muon_math.orthogonalized(n, r.reduction, r.output, r.batch, ns_steps, ns_dtype)
    if plan.mode == 'gather':
      for d in r.reduction + r.output:   # keep this device's pp block of the full matrix
        if plan.pp[d]:
          size = r.shape[d] // math.prod(mesh.shape[a] for a in plan.pp[d])
          u = jax.lax.dynamic_slice_in_dim(u, _linear_index(plan.pp[d], mesh) * size, size, d)
    else:
      for axis, dm, db in reversed(plan.a2a):
        u = jax.lax.all_to_all(u, axis, dm, db, tiled=True)
      by_dim: dict[int, list[str]] = {}
      for axis, db in plan.gather_back:
        by_dim.setdefault(db, []).append(axis)
      for db, axes in by_dim.items():   # ZeRO-1's all-gather over replicated axes
        u = jax.lax.all_gather(u, tuple(axes), axis=db, tiled=True)
    return u, m

  grad = constrain(grad, mesh, plan.grad_spec)
  return jax.shard_map(body, mesh=mesh, in_specs=(plan.grad_spec, plan.state_spec),
                       out_specs=(plan.param_spec, plan.state_spec), check_vma=False)(grad, mom)


def constrain(x, mesh: Optional[Mesh], spec: P):
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
