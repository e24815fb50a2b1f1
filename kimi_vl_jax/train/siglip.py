"""SigLIP sigmoid contrastive loss (Zhai et al. 2023), the contrastive half of CoCa-style
MoonViT pretraining (SPEC §6: ``L = L_siglip + 2 * L_caption``).

Every (image i, text j) pair is an independent binary problem: positive iff i == j.
``logits_ij = exp(t') * <zimg_i, ztxt_j> + b`` with a learnable log-temperature ``t'``
(init log 10) and bias ``b`` (init -10, so the initial loss is not dominated by the n^2 - n
negatives). The loss is ``-sum_ij log sigmoid(label_ij * logits_ij) / n``.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

INIT_LOG_TEMPERATURE = 2.302585092994046  # log(10)
INIT_BIAS = -10.0


def l2_normalize(x_nd: jax.Array, eps: float = 1e-6) -> jax.Array:
  x = x_nd.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def siglip_loss(zimg_nd: jax.Array, ztxt_nd: jax.Array, log_temperature: jax.Array,
                bias: jax.Array, valid_n: Optional[jax.Array] = None) -> jax.Array:
  """Sigmoid contrastive loss, averaged over valid examples (fp32 scalar).

  Args:
    zimg_nd, ztxt_nd: image / text embeddings (normalized here).
    log_temperature, bias: scalars (``t'`` and ``b``).
    valid_n: optional bool [N]; pairs touching an invalid (padding) example are dropped.
  """
  zi = l2_normalize(zimg_nd)
  zt = l2_normalize(ztxt_nd)
  n = zi.shape[0]
  logits_nn = jnp.exp(log_temperature.astype(jnp.float32)) * (zi @ zt.T) + bias.astype(jnp.float32)
  labels_nn = 2.0 * jnp.eye(n, dtype=jnp.float32) - 1.0
  pair_loss = -jax.nn.log_sigmoid(labels_nn * logits_nn)
  if valid_n is None:
    return jnp.sum(pair_loss) / n
  v = valid_n.astype(jnp.float32)
  pair_w = v[:, None] * v[None, :]
  return jnp.sum(pair_loss * pair_w) / jnp.maximum(jnp.sum(v), 1.0)
