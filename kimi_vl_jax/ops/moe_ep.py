"""Routed experts on a mesh: tokens stay on their devices; with an 'expert' axis they move by all-to-all.

Expert parallelism (``expert_parallel_ffn``). Inside ``jax.shard_map`` every device holds its
slice of the batch (split over the data-parallel axes, 'expert' included) and E / n experts
(n = size of 'expert'). Per device:

1. sort its (token, expert) assignments by destination device (expert // (E / n)) into a send
   buffer [n, Cs, D] (Cs rows per destination; assignments past Cs are dropped and counted),
2. ``all_to_all`` over 'expert': device j receives, from every device, the rows for its experts,
3. run its local experts on the received rows with any single-device backend (dropless),
4. ``all_to_all`` the results back and combine them with the routing weights in fp32.

Cs = ceil(capacity_factor * T_local * K / n) when capacity_factor > 0, else T_local * K (dropless:
even if every assignment goes to one device). Both exchanges are differentiable (the transpose
of an all-to-all is the reverse all-to-all), so gradients flow to tokens, weights and router.

Data parallelism without an 'expert' axis (``data_parallel_ffn``): every device dispatches
only its own tokens to all E experts (weights gathered, as FSDP does for any layer). Left to
GSPMD, the single-device dispatch (a sort and gathers over the GLOBAL token set) is not
partitioned: every device computed every token's experts, with dozens of collectives.
A fixed capacity then applies per device (C from the local tokens), as in GShard.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kimi_vl_jax.ops import moe_dispatch
from kimi_vl_jax.parallel.rules import BATCH_AXES

EXPERT_AXIS = 'expert'


def _ambient_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return None
  return mesh


def expert_parallel_size() -> int:
  """Size of the 'expert' axis of the ambient mesh (``jax.set_mesh``); 1 when there is none."""
  mesh = _ambient_mesh()
  if mesh is None or EXPERT_AXIS not in mesh.axis_names:
    return 1
  return int(mesh.shape[EXPERT_AXIS])


def data_parallel_shards(batch: int) -> int:
  """Devices the batch is split over for ``data_parallel_ffn``: the product of the ambient mesh's
  batch axes when there is no 'expert' axis > 1 and it divides ``batch``; else 1 (one dispatch)."""
  mesh = _ambient_mesh()
  if mesh is None or expert_parallel_size() > 1:
    return 1
  shards = math.prod(int(mesh.shape[ax]) for ax in BATCH_AXES if ax in mesh.axis_names)
  return shards if shards > 1 and batch % shards == 0 else 1


def send_capacity(local_tokens: int, top_k: int, ep: int, capacity_factor: float) -> int:
  if capacity_factor <= 0:
    return local_tokens * top_k
  return max(1, math.ceil(capacity_factor * local_tokens * top_k / ep))


def _local_ffn(x_btd, idx_btk, w_btk, w_gate, w_up, w_down, *, num_experts, ep, backend,
               capacity_factor, dtype, batch_axes):
  """Per-device body: dispatch -> all_to_all -> local experts -> all_to_all -> combine."""
  b, s, d = x_btd.shape
  k = idx_btk.shape[-1]
  t, a = b * s, b * s * k
  e_local = num_experts // ep
  x_td = x_btd.reshape(t, d)
  idx_a = idx_btk.reshape(a)
  routed_a = (idx_a >= 0) & (idx_a < num_experts)
  dest_a = jnp.where(routed_a, idx_a // e_local, ep)
  cs = send_capacity(t, k, ep, capacity_factor)
  plan = moe_dispatch.plan_capacity(dest_a, ep, k, cs)

  send_rd = moe_dispatch.gather_rows(x_td, plan.token_r, plan.slot_a.reshape(t, k))
  row_used = plan.assign_r < a
  send_e = jnp.where(row_used, jnp.take(idx_a, jnp.minimum(plan.assign_r, a - 1)) % e_local,
                     e_local)
  recv_rd = jax.lax.all_to_all(send_rd, EXPERT_AXIS, 0, 0, tiled=True)
  recv_e = jax.lax.all_to_all(send_e, EXPERT_AXIS, 0, 0, tiled=True)

  ones_r1 = jnp.ones((recv_e.shape[0], 1), jnp.float32)
  y_rd, local_dropped = moe_dispatch.expert_ffn(
      recv_rd, recv_e[:, None], ones_r1, w_gate, w_up, w_down, backend=backend,
      capacity_factor=0.0, dtype=dtype, expected_load=a / e_local)
  back_rd = jax.lax.all_to_all(y_rd.astype(dtype), EXPERT_AXIS, 0, 0, tiled=True)

  y_ad = moe_dispatch.gather_rows(back_rd, plan.slot_a, plan.assign_r[:, None])
  y_td = jnp.einsum('tkd,tk->td', y_ad.reshape(t, k, d).astype(jnp.float32),
                    w_btk.reshape(t, k).astype(jnp.float32))
  dropped = jax.lax.psum(plan.dropped + local_dropped, batch_axes)
  return y_td.reshape(b, s, d), dropped


def expert_parallel_ffn(x_btd, idx_btk, w_btk, w_gate_edf, w_up_edf, w_down_efd, *,
                        backend: str = 'auto', capacity_factor: float = 0.0, dtype=None):
  """``expert_ffn`` with experts sharded over the ambient mesh's 'expert' axis.

  x_btd [B, S, D], idx_btk / w_btk [B, S, K] (ids outside [0, E) are not routed), weights as in
  ``moe_dispatch.expert_ffn``. B must divide over the mesh's data-parallel axes and E over
  'expert'. Returns (y_btd float32, dropped int32 summed over all devices).
  """
  mesh = _ambient_mesh()
  if mesh is None or EXPERT_AXIS not in mesh.axis_names:
    raise ValueError("expert_parallel_ffn needs an ambient mesh with an 'expert' axis "
                     '(use jax.set_mesh(mesh))')
  ep = int(mesh.shape[EXPERT_AXIS])
  num_experts = w_gate_edf.shape[0]
  if num_experts % ep:
    raise ValueError(f'n_routed_experts={num_experts} is not divisible by the expert mesh axis '
                     f'({ep})')
  batch_axes = tuple(ax for ax in BATCH_AXES if ax in mesh.axis_names)
  shards = math.prod(int(mesh.shape[ax]) for ax in batch_axes)
  if x_btd.shape[0] % shards:
    raise ValueError(f'batch {x_btd.shape[0]} is not divisible by the {shards} data-parallel '
                     f'shards {batch_axes} needed for expert parallelism')
  dtype = dtype or x_btd.dtype

  def body(x, idx, w, wg, wu, wd):
    return _local_ffn(x, idx, w, wg, wu, wd, num_experts=num_experts, ep=ep,
                      backend=backend, capacity_factor=capacity_factor, dtype=dtype,
                      batch_axes=batch_axes)

  return _over_tokens(body, mesh, batch_axes, P(EXPERT_AXIS, None, None),
                      (x_btd, idx_btk, w_btk, w_gate_edf, w_up_edf, w_down_efd))


def _over_tokens(body, mesh, batch_axes, weight_spec, args):
  """``shard_map`` of body(x, idx, w, w_gate, w_up, w_down) -> (y, dropped): the token arrays
  split over ``batch_axes``, the three expert weights laid out as ``weight_spec``."""
  tok = P(batch_axes, None, None)
  in_specs = (tok, tok, tok, weight_spec, weight_spec, weight_spec)
  if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    # Explicit-sharding meshes require inputs already laid out as in_specs say.
    args = tuple(jax.reshard(a, spec) for a, spec in zip(args, in_specs))
  return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(tok, P()))(*args)


def data_parallel_ffn(x_btd, idx_btk, w_btk, w_gate_edf, w_up_edf, w_down_efd, *,
                      backend: str = 'auto', capacity_factor: float = 0.0, dtype=None):
  """``moe_dispatch.expert_ffn`` with each device dispatching its own slice of the batch.

  Same arguments as ``expert_parallel_ffn``; the ambient mesh's batch axes must divide B
  (``data_parallel_shards``). Returns (y_btd float32, dropped int32 summed over all devices).
  """
  mesh = _ambient_mesh()
  if mesh is None:
    raise ValueError('data_parallel_ffn needs an ambient mesh (use jax.set_mesh(mesh))')
  batch_axes = tuple(ax for ax in BATCH_AXES if ax in mesh.axis_names)
  b, s, d = x_btd.shape
  shards = math.prod(int(mesh.shape[ax]) for ax in batch_axes)
  if b % shards:
    raise ValueError(f'batch {b} is not divisible by the {shards} data-parallel shards '
                     f'{batch_axes}')
  k = idx_btk.shape[-1]
  dtype = dtype or x_btd.dtype

  def body(x, idx, w, wg, wu, wd):
    bl = x.shape[0]
    y_td, dropped = moe_dispatch.expert_ffn(
        x.reshape(bl * s, d), idx.reshape(bl * s, k), w.reshape(bl * s, k), wg, wu, wd,
        backend=backend, capacity_factor=capacity_factor, dtype=dtype)
    return y_td.reshape(bl, s, d), jax.lax.psum(dropped, batch_axes)

  return _over_tokens(body, mesh, batch_axes, P(None, None, None),
                      (x_btd, idx_btk, w_btk, w_gate_edf, w_up_edf, w_down_efd))
