"""Logical annotations -> NamedSharding, for parameter trees and for batches; host batches to
global arrays and sharded results back to the host, on one process or many."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kimi_vl_jax.parallel.rules import LOGICAL_AXIS_RULES


def _without_repeats(logical_axes: Sequence[Optional[str]]) -> tuple:
  """Later repeats of a logical name become None (replicated).

  One name may label several dims (rules.py: ``vision_pos`` for both H and W of the
  position table); Flax rejects repeats, and a mesh axis can split only one dim anyway.
  """
  seen, out = set(), []
  for name in logical_axes:
    out.append(None if name is not None and name in seen else name)
    seen.add(name)
  return tuple(out)


def logical_to_spec(logical_axes: Sequence[Optional[str]], rules=LOGICAL_AXIS_RULES) -> P:
  """PartitionSpec for one tensor given its logical axis names."""
  return nn.logical_to_mesh_axes(_without_repeats(logical_axes), rules)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[Optional[str]],
                     rules=LOGICAL_AXIS_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, rules))


def param_shardings(abstract_variables: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for a (possibly abstract) variable tree produced by ``init``.

  Leaves boxed in ``nn.LogicallyPartitioned`` get their rules-derived sharding;
  unannotated leaves are replicated. The returned tree has the boxes removed, so it
  matches ``nn.unbox(variables)``.
  """
  def leaf_sharding(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return NamedSharding(mesh, logical_to_spec(leaf.names, rules))
    if isinstance(leaf, nn.Partitioned):  # already names mesh axes
      return NamedSharding(mesh, P(*leaf.names))
    return NamedSharding(mesh, P())
  return jax.tree.map(leaf_sharding, abstract_variables,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def fit_spec_to_shape(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes that do not divide the dimension they shard (replicates it instead).

  Tiny test models have dims (e.g. 3 norm features) smaller than a mesh axis; jit
  would reject those shardings, so they fall back to replication per dimension.
  """
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    kept = []
    size = 1
    for name in names:
      if dim % (size * mesh.shape[name]) == 0:
        kept.append(name)
        size *= mesh.shape[name]
    out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  return P(*out)


def fitted_param_shardings(abstract_variables: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
  """``param_shardings`` with each spec fitted to its leaf's shape (see fit_spec_to_shape)."""
  shardings = param_shardings(abstract_variables, mesh, rules)
  shapes = jax.tree.map(lambda x: x.shape, nn.unbox(abstract_variables))
  return jax.tree.map(lambda s, shape: NamedSharding(mesh, fit_spec_to_shape(s.spec, shape, mesh)),
                      shardings, shapes, is_leaf=lambda x: isinstance(x, NamedSharding))


def batch_sharding(mesh: Mesh, ndim: int, rules=LOGICAL_AXIS_RULES) -> NamedSharding:
  """Sharding of a batch array [B, ...]: batch over the data-parallel axes, rest replicated."""
  return logical_sharding(mesh, ('batch',) + (None,) * (ndim - 1), rules)


def batch_shardings(batch: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
  """A tree of ``batch_sharding``s matching a tree of (host or abstract) arrays."""
  return jax.tree.map(lambda x: batch_sharding(mesh, np.ndim(x), rules), batch)


def make_global_batch(local_batch: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
  """Assembles process-local host arrays into global jax.Arrays sharded by batch.

  Each process passes its own slice of the global batch (global_batch / process_count
  rows); works unchanged on one host.
  """
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(x), rules), x),
      local_batch)


def make_global_batch_from_full(full_batch: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
  """Global jax.Arrays sharded by batch from host arrays that every process holds in full.

  ``full_batch``: a tree of host arrays [B, ...], identical on every process, B a multiple of
  the data-parallel size. Each process supplies exactly the rows its own devices hold
  (``x[index]`` of each addressable shard's global index), whatever the mesh's device order.
  On one process the result equals ``make_global_batch`` of the same data. For host data that
  every process computes identically (the RL rollouts, ``rl/loop.py``); ``make_global_batch``
  is for data each process reads its own slice of (the trainer's sources).
  """
  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, batch_sharding(mesh, x.ndim, rules),
                                        lambda index: x[index])
  return jax.tree.map(one, full_batch)


def gather_to_host(tree: Any) -> Any:
  """Device results as host numpy arrays of their full global value, on every process.

  An array sharded across processes (e.g. sampled tokens [B, T] split by batch) is all-gathered
  (``multihost_utils.process_allgather(tiled=True)``: a collective, so every process must call
  this for the same arrays in the same order); replicated and process-local arrays are copied
  as ``jax.device_get`` would, without communication. On one process this is
  ``np.asarray(jax.device_get(x))`` per leaf.
  """
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(one, tree)


@contextlib.contextmanager
def activation_context(mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Iterator[None]:
  """Trace model code under this: the mesh is ambient and logical constraints are live.

  ``jax.set_mesh`` makes the mesh visible to code that asks for it while tracing (expert
  parallelism's ``shard_map`` all-to-all, ``models/moe.py``) and ``nn.logical_axis_rules``
  turns the modules' ``nn.with_logical_constraint`` annotations into sharding constraints
  through the one rules table. Without it activations are left to GSPMD and experts on an
  'expert' axis are computed from gathered weights instead of exchanged tokens.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
