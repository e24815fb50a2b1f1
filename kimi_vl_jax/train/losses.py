"""Language-model losses: next-token cross-entropy with loss masks, per-source sums, MoE terms.

The A3B vocabulary (163840) at long S would need ``B*S*V*4`` bytes of fp32 logits (80 GiB at
B=1, S=128K), so ``chunked_cross_entropy`` never builds them: it scans over vocabulary chunks,
computing each chunk's logits from the final hidden states and the ``lm_head`` kernel, keeping an
online log-sum-exp, and is rematerialized in the backward pass (only ``[B, S]`` carries are saved
per chunk). Long rows also go through the sequence in slices (``token_chunk``), so one logits
block is at most [B, token_chunk, chunk_size].

All losses return *sums* plus weights, so microbatches and per-source breakdowns add up exactly;
the train step divides once at the end.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def shift_targets(tokens_bs: jax.Array, loss_mask_bs: jax.Array, segment_ids_bs: jax.Array):
  """Next-token targets and weights for packed rows.

  Position t predicts token t+1 when both lie in the same (non-padding) segment, and the
  *target* token's loss mask is set (SFT masks user/system tokens as targets).

  Returns:
    targets_bs: int32, tokens shifted left by one (last column 0).
    weights_bs: float32 in {0, 1}.
  """
  targets = jnp.concatenate([tokens_bs[:, 1:], jnp.zeros_like(tokens_bs[:, :1])], axis=1)
  next_seg = jnp.concatenate([segment_ids_bs[:, 1:], jnp.zeros_like(segment_ids_bs[:, :1])], axis=1)
  next_mask = jnp.concatenate([loss_mask_bs[:, 1:], jnp.zeros_like(loss_mask_bs[:, :1])], axis=1)
  same = (segment_ids_bs == next_seg) & (segment_ids_bs > 0)
  weights = (same & (next_mask > 0)).astype(jnp.float32)
  return targets.astype(jnp.int32), weights


def _soft_cap(logits, cap: float):
  return cap * jnp.tanh(logits / cap) if cap and cap > 0 else logits


def cross_entropy_from_logits(logits_bsv: jax.Array, targets_bs: jax.Array, *,
                              soft_cap: float = 0.0) -> jax.Array:
  """Per-token negative log-likelihood [B, S] (fp32) from full logits (the reference path)."""
  logits = _soft_cap(logits_bsv.astype(jnp.float32), soft_cap)
  lse = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, targets_bs[..., None], axis=-1)[..., 0]
  return lse - tgt


def chunked_cross_entropy(h_bsd: jax.Array, w_dv: jax.Array, targets_bs: jax.Array, *,
                          chunk_size: int = 8192, token_chunk: int = 0, soft_cap: float = 0.0,
                          compute_dtype=jnp.float32) -> jax.Array:
  """Per-token NLL [B, S] (fp32) of ``softmax(h @ w)`` without materializing [B, S, V].

  The largest logits block is [B, token_chunk, chunk_size] fp32: at S = 128K a row's
  [1, S, 16384] vocabulary slice alone is 8 GiB, so long rows also split the sequence.

  Args:
    h_bsd: final (normed) hidden states.
    w_dv: the lm_head kernel [D, V] (Flax layout).
    targets_bs: int target ids in [0, V).
    chunk_size: vocabulary slice per scan step; V is padded up to a multiple (padded columns
      get -inf logits, so they do not change the result).
    token_chunk: > 0: sequence slice per outer scan step (S is padded up to a multiple; padded
      positions are sliced off); 0: the whole sequence at once.
    soft_cap: optional ``cap * tanh(logits / cap)`` (0 = off).
    compute_dtype: matmul input dtype (accumulation is fp32).
  """
  d, v = w_dv.shape
  c = min(chunk_size, v)
  n = -(-v // c)
  if n * c != v:
    w_dv = jnp.pad(w_dv, ((0, 0), (0, n * c - v)))
  w_ndc = w_dv.reshape(d, n, c).transpose(1, 0, 2)
  h = h_bsd.astype(compute_dtype)
  bsz, seq = targets_bs.shape
  if token_chunk <= 0 or token_chunk >= seq:
    return _vocab_scan(h, w_ndc, targets_bs, v, soft_cap)
  k = -(-seq // token_chunk)
  pad = k * token_chunk - seq
  h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
  t = jnp.pad(targets_bs, ((0, 0), (0, pad)))
  # [K, B, Tc, ...]: the batch axis keeps its (data-parallel) sharding inside the scan.
  h_kbtd = h.reshape(bsz, k, token_chunk, d).transpose(1, 0, 2, 3)
  t_kbt = t.reshape(bsz, k, token_chunk).transpose(1, 0, 2)
  _, nll_kbt = jax.lax.scan(
      lambda _, xs: (None, _vocab_scan(xs[0], w_ndc, xs[1], v, soft_cap)), None, (h_kbtd, t_kbt))
  return nll_kbt.transpose(1, 0, 2).reshape(bsz, k * token_chunk)[:, :seq]


def _vocab_scan(h_bsd, w_ndc, targets_bs, v: int, soft_cap: float) -> jax.Array:
  """NLL [B, S] by an online log-sum-exp over the vocabulary slices ``w_ndc`` [N, D, C]."""
  c = w_ndc.shape[-1]
  bsz, seq = targets_bs.shape

  @jax.checkpoint
  def body(carry, xs):
    m_bs, l_bs, tgt_bs = carry
    w_dc, start = xs
    logits = jnp.einsum('bsd,dc->bsc', h_bsd, w_dc.astype(h_bsd.dtype),
                        preferred_element_type=jnp.float32)
    logits = _soft_cap(logits, soft_cap)
    col = start + jnp.arange(c)
    logits = jnp.where(col < v, logits, -jnp.inf)
    m_new = jnp.maximum(m_bs, jnp.max(logits, axis=-1))
    l_new = l_bs * jnp.exp(m_bs - m_new) + jnp.sum(jnp.exp(logits - m_new[..., None]), axis=-1)
    local = targets_bs - start
    inside = (local >= 0) & (local < c)
    picked = jnp.take_along_axis(logits, jnp.clip(local, 0, c - 1)[..., None], axis=-1)[..., 0]
    tgt_new = jnp.where(inside, picked, tgt_bs)
    return (m_new, l_new, tgt_new), None

  init = (jnp.full((bsz, seq), -jnp.inf, jnp.float32), jnp.zeros((bsz, seq), jnp.float32),
          jnp.zeros((bsz, seq), jnp.float32))
  starts = jnp.arange(w_ndc.shape[0], dtype=jnp.int32) * c
  (m, l, tgt), _ = jax.lax.scan(body, init, (w_ndc, starts))
  return m + jnp.log(l) - tgt


def weighted_sums(nll_bs: jax.Array, weights_bs: jax.Array, source_ids_bs: Optional[jax.Array],
                  num_sources: int) -> dict:
  """Loss sums: total and per source.

  Returns {'loss_sum': scalar, 'weight_sum': scalar, 'source_loss_sum': [K], 'source_weight_sum': [K]}
  (K = num_sources; the per-source arrays are zeros of length 0 when no source ids are given).
  """
  w = weights_bs.astype(jnp.float32)
  out = {'loss_sum': jnp.sum(nll_bs * w), 'weight_sum': jnp.sum(w)}
  if source_ids_bs is not None and num_sources > 0:
    onehot = jax.nn.one_hot(source_ids_bs, num_sources, dtype=jnp.float32)  # ids outside [0, K) -> 0
    out['source_loss_sum'] = jnp.einsum('bs,bsk->k', nll_bs * w, onehot)
    out['source_weight_sum'] = jnp.einsum('bs,bsk->k', w, onehot)
  else:
    out['source_loss_sum'] = jnp.zeros((max(num_sources, 0),), jnp.float32)
    out['source_weight_sum'] = jnp.zeros((max(num_sources, 0),), jnp.float32)
  return out


def expert_load_stats(load_le: jax.Array) -> dict:
  """Max/min expert load as a fraction of the mean (1.0 = perfectly balanced)."""
  load = load_le.astype(jnp.float32)
  mean = jnp.maximum(jnp.mean(load, axis=-1, keepdims=True), 1e-9)
  frac = load / mean
  return {'expert_load_max': jnp.max(frac), 'expert_load_min': jnp.min(frac)}
