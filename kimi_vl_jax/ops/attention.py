"""Attention over packed sequences: one function, several backends.

``attention(q_bshd, k_bshd, v_bshd, segment_ids_q_bs, ...)`` computes
``softmax(q k^T * scale + mask) v`` per head where the mask allows query i to see key j iff
both carry the same non-zero segment id and (when ``causal``) ``pos_kv[j] <= pos_q[i]``.
Segment id 0 marks padding: such keys are never attended and such queries output zeros.
``v`` may have a different head dim than ``q``/``k`` (MLA: 192-d scores, 128-d values).

Backends (same inputs, same outputs):
- ``xla``: pure JAX flash attention. Query blocks x key blocks with an online softmax, so
  no score matrix larger than one ``[block, block]`` tile per head exists; each query tile
  loops (traced while-loop bounds) over only the span of key tiles its segments and causal
  positions can reach, so tiles of other segments or the causal future cost nothing, not
  even a loop step. A custom VJP recomputes scores blockwise from the saved log-sum-exp, so
  forward+backward memory is linear in S. With ``head_groups`` > 1 it makes that many passes
  over the tiles, each over a slice of the heads, so a pass's score, probability and gradient
  tiles are that many times smaller and stay closer to a CPU core: the ``small`` preset's
  MoonViT (4 heads, 128 x 128 tiles) in 2 groups, ``python -m kimi_vl_jax.bench.vision`` run
  alternately with 2 and 1: one device 969 / 977 vs 1000 / 1068 ms a step, two devices
  784 / 843 vs 803 / 861 ms. (The bench LM, whose tiles hold 4 rows x 8 heads, ran slower in
  2, 4 or 8 groups.)
- ``naive``: full masked softmax (the test oracle; O(S^2) memory).
- ``cudnn``: ``jax.nn.dot_product_attention(implementation='cudnn')`` (GPU, bf16/fp16),
  with the segment/causal mask passed as its boolean ``mask``; v is zero-padded to the
  qk head dim because cuDNN needs equal head dims.
- ``splash``: Pallas splash attention (TPU) with ``SegmentIds``; its causal mask is by
  index, which equals causality by position when each segment is a contiguous run with
  increasing positions (the packer's layout). Sequences are padded to its 128-lane blocks.
  Attention of queries to other keys (prefill against a KV cache: different segment-id or
  position arrays) runs on ``xla`` instead, whose mask is by position.
- ``auto``: ``splash`` on TPU, ``cudnn`` on GPU for 16-bit inputs, else ``xla``.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import PartitionSpec as P

from kimi_vl_jax.parallel.mesh import target_platform
from kimi_vl_jax.parallel.rules import BATCH_AXES
from kimi_vl_jax.parallel.vma import vary_like

TENSOR_AXIS = 'tensor'

BACKENDS = ('auto', 'xla', 'naive', 'cudnn', 'splash')


def _allowed(seg_q_bq, seg_kv_bk, pos_q_bq, pos_kv_bk, causal: bool):
  """Boolean [B, Q, K]: query may attend key (same non-zero segment, causal by position)."""
  ok = (seg_q_bq[:, :, None] == seg_kv_bk[:, None, :]) & (seg_q_bq[:, :, None] != 0)
  if causal:
    ok &= pos_kv_bk[:, None, :] <= pos_q_bq[:, :, None]
  return ok


# ----------------------------------------------------------------------------- naive


def _naive(q, k, v, seg_q, seg_kv, pos_q, pos_kv, causal, scale):
  s_bhqk = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  ok_b1qk = _allowed(seg_q, seg_kv, pos_q, pos_kv, causal)[:, None]
  s_bhqk = jnp.where(ok_b1qk, s_bhqk, -jnp.inf)
  m = jnp.max(s_bhqk, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(ok_b1qk, jnp.exp(s_bhqk - m), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom == 0, 1.0, denom)
  o = jnp.einsum('bhqk,bkhd->bqhd', p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return o.astype(q.dtype)


# ------------------------------------------------------------------------------- xla
#
# Tiles are head-major ([B, H, b, D]) so every score and value product is a plain batched
# matmul over (B, H) with the contraction on the minor dim: no per-tile transposes (fwd+bwd
# ~20% faster on CPU than the [B, b, H, D] layout).


def _to_blocks(x_bhsd, n, b):
  """[B, H, n*b, D] -> [n, B, H, b, D]."""
  x = x_bhsd.reshape(x_bhsd.shape[0], x_bhsd.shape[1], n, b, x_bhsd.shape[-1])
  return jnp.moveaxis(x, 2, 0)


def _ids_to_blocks(x_bs, n, b):
  """[B, n*b] -> [n, B, b]."""
  return jnp.moveaxis(x_bs.reshape(x_bs.shape[0], n, b), 1, 0)


def _from_blocks(x_nbhqd):
  """[n, B, H, b, D] -> [B, H, n*b, D]."""
  n, b_sz, h, bq, d = x_nbhqd.shape
  return jnp.moveaxis(x_nbhqd, 0, 2).reshape(b_sz, h, n * bq, d)


def _tile_spans(sq_n, sk_n, pq_n, pk_n, causal):
  """Which tile pairs can hold an allowed (query, key) pair, as contiguous spans.

  A pair of tiles is needed when, in some batch row, the ranges of their non-zero segment ids
  overlap and (causal) the earliest key position is not after the latest query position: a
  cheap O(S) superset of the truly needed pairs (the exact mask is applied inside each tile).
  Returns int32 ``(k_lo [nq], k_hi [nq], q_lo [nk], q_hi [nk])``: query tile i visits key
  tiles k_lo[i]..k_hi[i] and key tile j query tiles q_lo[j]..q_hi[j]; an empty span has
  lo > hi. Packed rows keep each segment contiguous, so the spans hold no unneeded tile
  besides those the range test cannot rule out.
  """
  big = jnp.iinfo(jnp.int32).max

  def stats(s_nbt, p_nbt):   # per tile and batch row: [n, B]
    real = s_nbt != 0
    return (jnp.min(jnp.where(real, s_nbt, big), -1), jnp.max(jnp.where(real, s_nbt, 0), -1),
            jnp.min(jnp.where(real, p_nbt, big), -1), jnp.max(jnp.where(real, p_nbt, -1), -1))

  qs_lo, qs_hi, _, qp_hi = stats(sq_n, pq_n)
  ks_lo, ks_hi, kp_lo, _ = stats(sk_n, pk_n)
  need_qkb = ((qs_lo[:, None] <= ks_hi[None]) & (ks_lo[None] <= qs_hi[:, None])
              & (qs_hi[:, None] > 0) & (ks_hi[None] > 0))
  if causal:
    need_qkb &= kp_lo[None] <= qp_hi[:, None]
  need_qk = jnp.any(need_qkb, axis=-1)
  nq, nk = need_qk.shape
  k_idx, q_idx = jnp.arange(nk, dtype=jnp.int32), jnp.arange(nq, dtype=jnp.int32)
  k_lo = jnp.min(jnp.where(need_qk, k_idx[None], nk), axis=1)
  k_hi = jnp.max(jnp.where(need_qk, k_idx[None], -1), axis=1)
  q_lo = jnp.min(jnp.where(need_qk, q_idx[:, None], nq), axis=0)
  q_hi = jnp.max(jnp.where(need_qk, q_idx[:, None], -1), axis=0)
  return k_lo, k_hi, q_lo, q_hi


def _tile(x_n, i):
  """Tile i of a tiled array [n, ...] (a dynamic slice: i is traced)."""
  return jax.lax.dynamic_index_in_dim(x_n, i, axis=0, keepdims=False)


def _flash_fwd_blocks(q_n, k_n, v_n, sq_n, sk_n, pq_n, pk_n, causal, scale):
  """Forward over tiles. q/k/v [n, B, H, b, D], ids [n, B, b]; returns o [nq, B, H, bq, Dv]
  and the log-sum-exp [nq, B, H, bq] (0 on rows with no visible key).

  Each query tile loops (a while loop with traced bounds) over only its span of key tiles,
  so work and loop overhead follow the pairs that can interact, not nq x nk.
  """
  _, b_sz, h, bq, _ = q_n.shape
  dv = v_n.shape[-1]
  k_lo, k_hi, _, _ = _tile_spans(sq_n, sk_n, pq_n, pk_n, causal)

  def q_block(_, xs):
    q_bhqd, sq_bq, pq_bq, lo, hi = xs

    def kv_block(j, carry):
      m_bhq, l_bhq, acc_bhqd = carry
      k_bhkd, v_bhkd = _tile(k_n, j), _tile(v_n, j)
      ok_b1qk = _allowed(sq_bq, _tile(sk_n, j), pq_bq, _tile(pk_n, j), causal)[:, None]
      s = jnp.einsum('bhqd,bhkd->bhqk', q_bhqd, k_bhkd,
                     preferred_element_type=jnp.float32) * scale
      s = jnp.where(ok_b1qk, s, -jnp.inf)
      m_new = jnp.maximum(m_bhq, jnp.max(s, axis=-1))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)   # all masked so far: no NaN
      p = jnp.exp(s - m_safe[..., None])
      alpha = jnp.exp(m_bhq - m_safe)
      l_new = alpha * l_bhq + jnp.sum(p, axis=-1)
      pv = jnp.einsum('bhqk,bhkd->bhqd', p.astype(v_bhkd.dtype), v_bhkd,
                      preferred_element_type=jnp.float32)
      return m_new, l_new, alpha[..., None] * acc_bhqd + pv

    # Carries vary like the tiles, so the loop also traces inside shard_map.
    init = tuple(vary_like(x, q_bhqd, k_n, v_n, sk_n, pk_n) for x in (
        jnp.full((b_sz, h, bq), -jnp.inf, jnp.float32), jnp.zeros((b_sz, h, bq), jnp.float32),
        jnp.zeros((b_sz, h, bq, dv), jnp.float32)))
    m, l, acc = jax.lax.fori_loop(lo, hi + 1, kv_block, init)
    empty = l == 0   # padding query or no visible key: output zeros
    o_bhqd = acc / jnp.where(empty, 1.0, l)[..., None]
    lse_bhq = jnp.where(empty, 0.0, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(jnp.where(empty, 1.0, l)))
    return None, (o_bhqd.astype(q_bhqd.dtype), lse_bhq)

  _, (o_n, lse_n) = jax.lax.scan(q_block, None, (q_n, sq_n, pq_n, k_lo, k_hi))
  return o_n, lse_n


def _flash_bwd_blocks(q_n, k_n, v_n, sq_n, sk_n, pq_n, pk_n, o_n, lse_n, do_n, causal, scale):
  """Backward over tiles (FlashAttention-2 order: key tiles outside, so dk/dv stay in the
  inner carry; scores recomputed from the saved log-sum-exp); each key tile visits only its
  span of query tiles and adds its dq into that tile in place. Returns dq, dk, dv tiles.

  Scores are recomputed transposed, [k, q], so dv = P^T dO and dk = dS^T Q contract over
  their operands' minor axis, the form XLA:CPU runs fastest (only dq = dS K does not; with
  [q, k] scores dv and dk both would): one layer's fwd+bwd measured 4-6% faster.
  """
  _, _, q_lo, q_hi = _tile_spans(sq_n, sk_n, pq_n, pk_n, causal)
  delta_n = jnp.einsum('nbhqd,nbhqd->nbhq', do_n.astype(jnp.float32), o_n.astype(jnp.float32))

  def kv_block(dq_n, ys):
    k_bhkd, v_bhkd, sk_bk, pk_bk, lo, hi = ys

    def q_block(i, carry):
      dk_bhkd, dv_bhkd, dq_n = carry
      q_bhqd, do_bhqd = _tile(q_n, i), _tile(do_n, i)
      lse_bhq, delta_bhq = _tile(lse_n, i), _tile(delta_n, i)
      ok_b1kq = jnp.swapaxes(_allowed(_tile(sq_n, i), sk_bk, _tile(pq_n, i), pk_bk, causal),
                             1, 2)[:, None]
      s_t = jnp.einsum('bhkd,bhqd->bhkq', k_bhkd, q_bhqd,
                       preferred_element_type=jnp.float32) * scale
      p_t = jnp.where(ok_b1kq, jnp.exp(s_t - lse_bhq[:, :, None, :]), 0.0)
      dv_bhkd = dv_bhkd + jnp.einsum('bhkq,bhqd->bhkd', p_t.astype(do_bhqd.dtype), do_bhqd,
                                     preferred_element_type=jnp.float32)
      dp_t = jnp.einsum('bhkd,bhqd->bhkq', v_bhkd, do_bhqd, preferred_element_type=jnp.float32)
      ds_t = p_t * (dp_t - delta_bhq[:, :, None, :]) * scale
      dk_bhkd = dk_bhkd + jnp.einsum('bhkq,bhqd->bhkd', ds_t.astype(q_bhqd.dtype), q_bhqd,
                                     preferred_element_type=jnp.float32)
      dq = jnp.einsum('bhkq,bhkd->bhqd', ds_t.astype(k_bhkd.dtype), k_bhkd,
                      preferred_element_type=jnp.float32)
      dq_n = jax.lax.dynamic_update_index_in_dim(dq_n, _tile(dq_n, i) + dq, i, axis=0)
      return dk_bhkd, dv_bhkd, dq_n

    refs = (k_bhkd, v_bhkd, q_n, do_n, lse_n, sq_n, pq_n)
    init = (vary_like(jnp.zeros(k_bhkd.shape, jnp.float32), *refs),
            vary_like(jnp.zeros(v_bhkd.shape, jnp.float32), *refs), dq_n)
    dk, dv, dq_n = jax.lax.fori_loop(lo, hi + 1, q_block, init)
    return dq_n, (dk, dv)

  dq0 = vary_like(jnp.zeros(q_n.shape, jnp.float32), q_n, k_n, v_n, do_n, lse_n, sq_n, sk_n)
  dq_n, (dk_n, dv_n) = jax.lax.scan(kv_block, dq0,
                                    (k_n, v_n, sk_n, pk_n, q_lo, q_hi))
  return dq_n.astype(q_n.dtype), dk_n.astype(k_n.dtype), dv_n.astype(v_n.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _flash(q_n, k_n, v_n, sq_n, sk_n, pq_n, pk_n, causal, scale):
  return _flash_fwd_blocks(q_n, k_n, v_n, sq_n, sk_n, pq_n, pk_n, causal, scale)[0]


def _flash_fwd(q_n, k_n, v_n, sq_n, sk_n, pq_n, pk_n, causal, scale):
  o_n, lse_n = _flash_fwd_blocks(q_n, k_n, v_n, sq_n, sk_n, pq_n, pk_n, causal, scale)
  return o_n, (q_n, k_n, v_n, sq_n, sk_n, pq_n, pk_n, o_n, lse_n)


def _flash_bwd(causal, scale, res, do_n):
  q_n, k_n, v_n, sq_n, sk_n, pq_n, pk_n, o_n, lse_n = res
  dq, dk, dv = _flash_bwd_blocks(q_n, k_n, v_n, sq_n, sk_n, pq_n, pk_n, o_n, lse_n, do_n,
                                 causal, scale)
  return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_to(x, length, value=0):
  pad = length - x.shape[1]
  if pad == 0:
    return x
  widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
  return jnp.pad(x, widths, constant_values=value)


def _xla(q, k, v, seg_q, seg_kv, pos_q, pos_kv, causal, scale, block_size, head_groups=1):
  if head_groups > 1:
    hs = q.shape[2] // head_groups
    group = lambda x, i: x[:, :, i * hs:(i + 1) * hs]
    return jnp.concatenate(
        [_xla(group(q, i), group(k, i), group(v, i), seg_q, seg_kv, pos_q, pos_kv, causal, scale,
              block_size) for i in range(head_groups)], axis=2)
  sq, skv = q.shape[1], k.shape[1]
  bq, bk = min(block_size, sq), min(block_size, skv)
  nq, nk = -(-sq // bq), -(-skv // bk)
  # Padded positions carry segment 0, so they neither attend nor are attended.
  q, seg_q, pos_q = (_pad_to(x, nq * bq) for x in (q, seg_q, pos_q))
  k, v, seg_kv, pos_kv = (_pad_to(x, nk * bk) for x in (k, v, seg_kv, pos_kv))
  # Tie the ids to q: a function of the ids alone is loop-invariant inside a scan over layers,
  # and JAX's scan partial eval would hoist the whole tile-mask computation out of the loop and
  # materialize it for every tile ([nq, nk, B, H, bq, bk]: 0.4 GB per layer for 4480 patches).
  seg_q, seg_kv, pos_q, pos_kv, _ = jax.lax.optimization_barrier((seg_q, seg_kv, pos_q, pos_kv, q))
  head_major = lambda x_bshd: jnp.swapaxes(x_bshd, 1, 2)
  o_n = _flash(_to_blocks(head_major(q), nq, bq), _to_blocks(head_major(k), nk, bk),
               _to_blocks(head_major(v), nk, bk),
               _ids_to_blocks(seg_q, nq, bq), _ids_to_blocks(seg_kv, nk, bk),
               _ids_to_blocks(pos_q, nq, bq), _ids_to_blocks(pos_kv, nk, bk), causal, scale)
  return jnp.swapaxes(_from_blocks(o_n), 1, 2)[:, :sq]


# ------------------------------------------------------------------------ cudnn / splash


def _cudnn(q, k, v, seg_q, seg_kv, pos_q, pos_kv, causal, scale):
  dqk, dv = q.shape[-1], v.shape[-1]
  if dv > dqk:
    raise ValueError(f'cudnn attention: v head dim {dv} > qk head dim {dqk}')
  v_pad = jnp.pad(v, [(0, 0)] * 3 + [(0, dqk - dv)]) if dv < dqk else v
  mask_b1qk = _allowed(seg_q, seg_kv, pos_q, pos_kv, causal)[:, None]
  o = jax.nn.dot_product_attention(q, k, v_pad, mask=mask_b1qk, scale=scale,
                                   implementation='cudnn')
  return o[..., :dv]


SPLASH_LANES = 128   # TPU vector lanes: splash's sequence blocks must be multiples of this


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def splash_blocks(seq: int, block_size: int) -> tuple[int, int]:
  """(block, padded length) of one splash sequence axis of length ``seq``.

  The kernel needs blocks that are multiples of 128 lanes and divide the sequence, so short
  or ragged axes (a model's init example, an image of a few hundred patches) are padded up:
  the block is ``block_size`` rounded up to lanes (a config tuned for the xla backend on CPU,
  e.g. 64, runs unchanged on TPU) and capped at the lane-rounded length; the length a multiple
  of the block.
  """
  block = min(_round_up(block_size, SPLASH_LANES), _round_up(seq, SPLASH_LANES))
  return block, _round_up(seq, block)


def _splash(q, k, v, seg_q, seg_kv, causal, scale, block_size, interpret=False):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  _, sq, h, _ = q.shape
  skv = k.shape[1]
  if causal and sq != skv:
    raise ValueError('splash attention: causal needs equal query and key lengths')
  bq, sq_pad = splash_blocks(sq, block_size)
  bk, skv_pad = splash_blocks(skv, block_size)
  # Padding rows get segment 0: real queries never see padded keys (different segment), and
  # padded queries are sliced off below. Padding at the end keeps causality by index.
  pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
  q, seg_q = pad(q, sq_pad), pad(seg_q, sq_pad)
  k, v, seg_kv = pad(k, skv_pad), pad(v, skv_pad), pad(seg_kv, skv_pad)
  mask_cls = sa.CausalMask if causal else sa.FullMask
  mask = sa.MultiHeadMask([mask_cls((sq_pad, skv_pad)) for _ in range(h)])
  sizes = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                        block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
  kernel = sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)
  # Splash wants [H, S, D] per example and scale folded into q.
  q_hsd = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2)
  k_hsd, v_hsd = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
  # Padding keys (segment 0) could be seen by padding queries only; those outputs are zeroed
  # below, and a padding query keeps a non-empty row (itself), so no 0/0 inside the kernel.
  o_bhsd = jax.vmap(lambda q1, k1, v1, s1, s2: kernel(q1, k1, v1, sa.SegmentIds(s1, s2)))(
      q_hsd, k_hsd, v_hsd, seg_q, seg_kv)
  return jnp.swapaxes(o_bhsd, 1, 2)[:, :sq]


def _splash_sharded(q, k, v, seg_q, seg_kv, causal, scale, block_size, interpret=False):
  """``_splash`` per device under the ambient mesh (``jax.set_mesh``).

  XLA cannot partition a Mosaic kernel, so on a multi-device mesh the kernel runs inside
  ``shard_map``: the batch split over the mesh's batch axes that divide it, heads over
  'tensor' when it divides them. Axes already manual (an enclosing ``shard_map``) are left
  alone. Without a mesh (or on one device) the kernel is called directly.
  """
  run = functools.partial(_splash, causal=causal, scale=scale, block_size=block_size,
                          interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return run(q, k, v, seg_q, seg_kv)
  free = {n: int(mesh.shape[n]) for n in mesh.axis_names if n not in mesh.manual_axes}
  batch_axes, split = [], 1
  for ax in BATCH_AXES:
    if free.get(ax, 1) > 1 and q.shape[0] % (split * free[ax]) == 0:
      batch_axes.append(ax)
      split *= free[ax]
  head_axis = TENSOR_AXIS if free.get(TENSOR_AXIS, 1) > 1 and \
      q.shape[2] % free[TENSOR_AXIS] == 0 else None
  if not batch_axes and head_axis is None:
    return run(q, k, v, seg_q, seg_kv)
  b = tuple(batch_axes) or None
  x_spec, seg_spec = P(b, None, head_axis, None), P(b, None)
  # Every free axis manual (those not in the specs replicate): Mosaic refuses any axis left
  # to the partitioner, even one of size 1.
  return jax.shard_map(run, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, seg_spec, seg_spec),
                       out_specs=x_spec, axis_names=set(free), check_vma=False)(
                           q, k, v, seg_q, seg_kv)


# ------------------------------------------------------------------------------- entry


def resolve_backend(backend: str, dtype=jnp.float32) -> str:
  """The concrete backend 'auto' stands for on this platform (others returned as is)."""
  if backend not in BACKENDS:
    raise ValueError(f'attention backend {backend!r} not in {BACKENDS}')
  if backend != 'auto':
    return backend
  platform = target_platform()   # the ambient mesh's devices (AOT for TPU from a CPU host)
  if platform == 'tpu':
    return 'splash'
  if platform in ('gpu', 'cuda') and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return 'cudnn'
  return 'xla'


def attention(q_bshd: jax.Array, k_bshd: jax.Array, v_bshd: jax.Array,
              segment_ids_q_bs: jax.Array, segment_ids_kv_bs: Optional[jax.Array] = None, *,
              causal: bool, backend: str = 'auto', scale: Optional[float] = None,
              block_size: int = 512, positions_q_bs: Optional[jax.Array] = None,
              positions_kv_bs: Optional[jax.Array] = None, head_groups: int = 1) -> jax.Array:
  """Masked multi-head attention over packed sequences.

  Args:
    q_bshd: queries [B, Sq, H, Dk]; k_bshd: keys [B, Skv, H, Dk]; v_bshd: values [B, Skv, H, Dv].
    segment_ids_q_bs: int [B, Sq], 0 = padding; segment_ids_kv_bs: int [B, Skv] (default: the
      query ids, i.e. self-attention).
    causal: mask keys whose position is after the query's.
    backend: one of ``BACKENDS``.
    scale: logit scale (default Dk^-0.5).
    block_size: query/key tile of the ``xla`` (and ``splash``) backend.
    positions_q_bs / positions_kv_bs: int [B, S] positions for the causal test (default: the
      index in the sequence; pass the per-segment positions when decoding against a cache).
    head_groups: the ``xla`` backend's passes over the tiles, each over H / head_groups heads
      (module docstring); it must divide H. Other backends ignore it.
  Returns:
    [B, Sq, H, Dv] in q's dtype; zeros where the query is padding.
  """
  if q_bshd.ndim != 4 or k_bshd.ndim != 4 or v_bshd.ndim != 4:
    raise ValueError(f'attention: q, k, v must be [B, S, H, D]; got {q_bshd.shape}, '
                     f'{k_bshd.shape}, {v_bshd.shape}')
  if k_bshd.shape[:3] != v_bshd.shape[:3] or q_bshd.shape[-1] != k_bshd.shape[-1] or \
     q_bshd.shape[0] != k_bshd.shape[0] or q_bshd.shape[2] != k_bshd.shape[2]:
    raise ValueError(f'attention: incompatible q {q_bshd.shape}, k {k_bshd.shape}, v {v_bshd.shape}')
  b, sq = q_bshd.shape[:2]
  skv = k_bshd.shape[1]
  if head_groups < 1 or q_bshd.shape[2] % head_groups:
    raise ValueError(f'attention: head_groups={head_groups} must divide the {q_bshd.shape[2]} heads')
  # Self-attention over one packed row: keys are the queries' own tokens (same ids, same
  # positions). Splash's causal mask is by index, which is causality only in that case.
  self_attention = (segment_ids_kv_bs is None or segment_ids_kv_bs is segment_ids_q_bs) and (
      positions_kv_bs is positions_q_bs)
  if segment_ids_kv_bs is None:
    if sq != skv:
      raise ValueError('attention: segment_ids_kv_bs is required when Sq != Skv')
    segment_ids_kv_bs = segment_ids_q_bs
  if segment_ids_q_bs.shape != (b, sq) or segment_ids_kv_bs.shape != (b, skv):
    raise ValueError(f'attention: segment ids {segment_ids_q_bs.shape}/{segment_ids_kv_bs.shape} '
                     f'do not match q {q_bshd.shape} / k {k_bshd.shape}')
  if positions_q_bs is None:
    positions_q_bs = jnp.broadcast_to(jnp.arange(sq, dtype=jnp.int32), (b, sq))
  if positions_kv_bs is None:
    positions_kv_bs = jnp.broadcast_to(jnp.arange(skv, dtype=jnp.int32), (b, skv))
  scale = float(q_bshd.shape[-1]) ** -0.5 if scale is None else float(scale)
  seg_q = segment_ids_q_bs.astype(jnp.int32)
  seg_kv = segment_ids_kv_bs.astype(jnp.int32)
  pos_q = positions_q_bs.astype(jnp.int32)
  pos_kv = positions_kv_bs.astype(jnp.int32)

  name = resolve_backend(backend, q_bshd.dtype)
  if name == 'splash' and not self_attention:
    # Queries against other keys (prefill into a KV cache): the xla backend's mask is by
    # position, which splash's is not.
    name = 'xla'
  if name == 'naive':
    return _naive(q_bshd, k_bshd, v_bshd, seg_q, seg_kv, pos_q, pos_kv, causal, scale)
  if name == 'xla':
    return _xla(q_bshd, k_bshd, v_bshd, seg_q, seg_kv, pos_q, pos_kv, causal, scale, block_size,
                head_groups)
  if name == 'cudnn':
    o = _cudnn(q_bshd, k_bshd, v_bshd, seg_q, seg_kv, pos_q, pos_kv, causal, scale)
  else:
    o = _splash_sharded(q_bshd, k_bshd, v_bshd, seg_q, seg_kv, causal, scale, block_size)
  # Fused kernels give padding rows a softmax over something; the contract says zeros.
  return jnp.where((seg_q != 0)[:, :, None, None], o, jnp.zeros_like(o))
