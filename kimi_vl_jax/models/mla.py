"""Multi-head latent attention (MLA, DeepSeek-V2/V3; SPEC §3.1) over packed sequences.

```
q        = q_proj(x)  or  q_b_proj(rmsnorm(q_a_proj(x)))       [B,S,H,Dn+R]
c, k_pe  = split(kv_a_proj_with_mqa(x))                         [B,S,C], [B,S,R]
c        = rmsnorm_1e-6(c)                                      the cached latent
k_nope,v = split(kv_b_proj(c))                                  [B,S,H,Dn], [B,S,H,Dv]
rope (interleaved pairs) on q_pe and k_pe; k_pe shared by all heads
o        = o_proj(attention([q_nope|q_pe], [k_nope|k_pe], v) with scale (Dn+R)^-0.5)
```
Kernels: q_proj [embed, heads, Dn+R]; kv_a_proj_with_mqa [embed, C+R]; kv_b_proj
[C, heads, Dn+Dv] (per head k_nope then v, the checkpoint's order); o_proj [heads, Dv, embed].

Decoding with a cache: the cache holds per token only the normalized latent ``c`` [C] and the
roped ``k_pe`` [R]. A one-token step absorbs kv_b_proj: scores = (q_nope W_k) . c + q_pe . k_pe and
o = (p . c) W_v, so keys and values are never expanded. Longer chunks (prefill) expand the cache
and use the attention op.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import FrozenConfigDict

from kimi_vl_jax.models.norms import RMSNorm
from kimi_vl_jax.ops.attention import attention
from kimi_vl_jax.ops.rotary import apply_rope_interleaved


def _absorbed_attention(q_nope_bshn, q_pe_bshr, ckv_btc, kpe_btr, w_k_chn, w_v_chv,
                        seg_q_bs, seg_kv_bt, pos_q_bs, pos_kv_bt, scale):
  """Attention in latent space (decode): never forms per-head keys/values. Returns [B,S,H,Dv]."""
  f32 = jnp.float32
  q_lat_bshc = jnp.einsum('bshn,chn->bshc', q_nope_bshn, w_k_chn, preferred_element_type=f32)
  s_bhst = (jnp.einsum('bshc,btc->bhst', q_lat_bshc, ckv_btc.astype(f32))
            + jnp.einsum('bshr,btr->bhst', q_pe_bshr, kpe_btr, preferred_element_type=f32)) * scale
  ok_bst = ((seg_q_bs[:, :, None] == seg_kv_bt[:, None, :]) & (seg_q_bs[:, :, None] != 0)
            & (pos_kv_bt[:, None, :] <= pos_q_bs[:, :, None]))
  s_bhst = jnp.where(ok_bst[:, None], s_bhst, -jnp.inf)
  m = jnp.max(s_bhst, axis=-1, keepdims=True)
  p = jnp.where(ok_bst[:, None], jnp.exp(s_bhst - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  den = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(den == 0, 1.0, den)
  o_lat_bshc = jnp.einsum('bhst,btc->bshc', p, ckv_btc.astype(f32))
  return jnp.einsum('bshc,chv->bshv', o_lat_bshc, w_v_chv.astype(f32))


class _Kernel(nn.Module):
  """A bare weight (named ``kernel`` like a Dense's) for einsums that Dense cannot express."""
  shape: tuple
  axes: tuple
  init_std: float
  param_dtype: str

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param('kernel', nn.with_logical_partitioning(
        nn.initializers.normal(self.init_std), self.axes), self.shape, jnp.dtype(self.param_dtype))


class MLA(nn.Module):
  """MLA self-attention. ``config``: the lm block (FrozenConfigDict)."""
  config: FrozenConfigDict

  @nn.compact
  def __call__(self, x_bsd: jax.Array, segment_ids_bs: jax.Array, positions_bs: jax.Array,
               cache: Optional[dict] = None, cache_meta: Optional[dict] = None):
    """Args:
      x_bsd: [B, S, D] normalized hidden states.
      segment_ids_bs / positions_bs: int [B, S] (0 = padding; positions restart per segment).
      cache: this layer's {'ckv': [B, T, C], 'kpe': [B, T, R]} or None (training / full forward).
      cache_meta: {'segment_ids': [B, T], 'positions': [B, T] (already holding the new tokens),
        'index': int32 [] first slot the new S tokens are written to}.
    Returns:
      (y_bsd, new_cache or None)
    """
    cfg = self.config
    h, dn, r, dv = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                    cfg.v_head_dim)
    c = cfg.kv_lora_rank
    dtype = jnp.dtype(cfg.dtype)

    def dense(features, axes, name, axis=-1):
      """A bias-free projection contracting the trailing ``axis`` of x with a kernel [*in, *features].

      Own kernel + einsum instead of nn.DenseGeneral: DenseGeneral initializes multi-dim kernels
      flat and reshapes, which breaks logical sharding constraints on the boxed kernel.
      """
      features = (features,) if isinstance(features, int) else tuple(features)
      axis = (axis,) if isinstance(axis, int) else tuple(axis)

      def apply(x):
        in_shape = tuple(x.shape[a] for a in axis)
        w = _Kernel(in_shape + features, axes, cfg.initializer_range, cfg.param_dtype, name=name)()
        x2 = x.reshape(x.shape[:x.ndim - len(in_shape)] + (-1,)).astype(dtype)
        y = x2 @ w.reshape(-1, int(np.prod(features))).astype(dtype)
        return y.reshape(y.shape[:-1] + features)

      return apply

    x_bsd = x_bsd.astype(dtype)
    b_sz, s_len = x_bsd.shape[:2]

    def per_token(fn, x_bs_):
      # Projections run on a [tokens, ...] view: XLA:CPU's 2-D dots (and weight gradients that
      # contract over tokens) are about 2x faster than with [B, S] leading dims.
      y = fn(x_bs_.reshape((b_sz * s_len,) + x_bs_.shape[2:]))
      return y.reshape((b_sz, s_len) + y.shape[1:])

    if cfg.q_lora_rank:
      q_lat = per_token(dense(cfg.q_lora_rank, ('embed', 'q_lora'), 'q_a_proj'), x_bsd)
      # The latent norms use the reference's default eps (1e-6), not rms_norm_eps.
      q_lat = RMSNorm(eps=cfg.kv_lora_norm_eps, param_dtype=cfg.param_dtype,
                      name='q_a_layernorm')(q_lat)
      q_bshk = per_token(dense((h, dn + r), ('q_lora', 'heads', 'kv'), 'q_b_proj'), q_lat)
    else:
      q_bshk = per_token(dense((h, dn + r), ('embed', 'heads', 'kv'), 'q_proj'), x_bsd)
    q_bshk = nn.with_logical_constraint(q_bshk, ('batch', 'length', 'act_heads', 'act_kv'))
    q_nope, q_pe = q_bshk[..., :dn], q_bshk[..., dn:]
    q_pe = apply_rope_interleaved(q_pe, positions_bs, cfg.rope_theta)

    ckv_full = per_token(dense(c + r, ('embed', 'kv_lora'), 'kv_a_proj_with_mqa'), x_bsd)
    ckv_bsc = RMSNorm(eps=cfg.kv_lora_norm_eps, param_dtype=cfg.param_dtype,
                      name='kv_a_layernorm')(ckv_full[..., :c])
    kpe_bsr = apply_rope_interleaved(ckv_full[..., c:], positions_bs, cfg.rope_theta)

    w_chk = _Kernel((c, h, dn + dv), ('kv_lora', 'heads', 'kv'), cfg.initializer_range,
                    cfg.param_dtype, name='kv_b_proj')()
    def kv_b(c_btc):
      c_nc = c_btc.reshape(-1, c).astype(dtype)
      kv_nhk = jnp.einsum('nc,chk->nhk', c_nc, w_chk.astype(dtype))
      return kv_nhk.reshape(c_btc.shape[:2] + kv_nhk.shape[1:])

    scale = (dn + r) ** -0.5
    new_cache = None
    if cache is None:
      kv_bshk = kv_b(ckv_bsc)
      k_bshk = jnp.concatenate(
          [kv_bshk[..., :dn], jnp.broadcast_to(kpe_bsr[:, :, None, :], kpe_bsr.shape[:2] + (h, r))],
          axis=-1)
      q_full = jnp.concatenate([q_nope, q_pe], axis=-1)
      o_bshv = attention(q_full, k_bshk, kv_bshk[..., dn:], segment_ids_bs, causal=True,
                         backend=cfg.attention_backend, scale=scale,
                         block_size=cfg.attention_block_size, positions_q_bs=positions_bs,
                         positions_kv_bs=positions_bs)
    else:
      idx = cache_meta['index']
      ckv_btc = jax.lax.dynamic_update_slice(cache['ckv'], ckv_bsc.astype(cache['ckv'].dtype),
                                             (0, idx, 0))
      kpe_btr = jax.lax.dynamic_update_slice(cache['kpe'], kpe_bsr.astype(cache['kpe'].dtype),
                                             (0, idx, 0))
      new_cache = {'ckv': ckv_btc, 'kpe': kpe_btr}
      seg_kv, pos_kv = cache_meta['segment_ids'], cache_meta['positions']
      if x_bsd.shape[1] == 1:
        # Decode: absorb kv_b_proj; touch only the latent cache.
        o_bshv = _absorbed_attention(q_nope, q_pe, ckv_btc, kpe_btr, w_chk[..., :dn],
                                     w_chk[..., dn:], segment_ids_bs, seg_kv, positions_bs,
                                     pos_kv, scale).astype(dtype)
      else:
        kv_bthk = kv_b(ckv_btc)
        t = ckv_btc.shape[1]
        k_bthk = jnp.concatenate(
            [kv_bthk[..., :dn], jnp.broadcast_to(kpe_btr[:, :, None, :].astype(dtype), (x_bsd.shape[0], t, h, r))],
            axis=-1)
        q_full = jnp.concatenate([q_nope, q_pe], axis=-1)
        o_bshv = attention(q_full, k_bthk, kv_bthk[..., dn:], segment_ids_bs, seg_kv, causal=True,
                           backend=cfg.attention_backend, scale=scale,
                           block_size=cfg.attention_block_size, positions_q_bs=positions_bs,
                           positions_kv_bs=pos_kv)
    o_bshv = nn.with_logical_constraint(o_bshv, ('batch', 'length', 'act_heads', 'act_kv'))
    y_bsd = per_token(dense(x_bsd.shape[-1], ('heads', 'kv', 'embed'), 'o_proj', axis=(-2, -1)),
                      o_bshv)
    return y_bsd, new_cache
