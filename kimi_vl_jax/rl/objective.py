"""The k1.5 online policy mirror descent objective (no value network).

Shapes: ``P`` prompts, ``k`` responses per prompt sampled from the current policy ``pi_i``, which
is also the reference; ``B = P * k`` response rows of ``S`` tokens for ``sequence_logprobs``.
Log-probabilities are natural-log nats, summed over the response tokens of a sequence; rewards
``r_pk`` are unitless (``rewards.shaped_rewards``). All outputs are float32.

With the per-prompt baseline ``a_pj = r_pj - mean_j r_pj`` and log ratio
``d_pj = logp_pj - logp_ref_pj``, the surrogate of the paper is

  squared_surrogate = mean_p mean_j (a_pj - tau * d_pj)^2,

and ``mirror_descent_loss`` is the per-sequence loss with the same gradient direction,

  mean_{p,j} [ -stop_grad(a_pj) * logp_pj + (tau / 2) * d_pj^2 ].

Differentiating both with respect to ``logp_pj`` (``r`` and ``logp_ref`` constant):

  d squared_surrogate / d logp_pj = -(2 tau / (P k)) (a_pj - tau d_pj),
  d mirror_descent_loss / d logp_pj = -(1 / (P k)) (a_pj - tau d_pj),

so ``grad squared_surrogate = 2 * tau * grad mirror_descent_loss`` everywhere, and at
``logp == logp_ref`` the latter is ``-a_pj / (P k)``. The per-sequence form is used for training
because its scale does not vanish with ``tau``.
"""
from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp


def sequence_logprobs(token_logp_bs: jax.Array, response_mask_bs: jax.Array) -> jax.Array:
  """Sequence log-prob ``logp_b``: fp32 sum of ``token_logp_bs`` over response tokens [B].

  Positions where ``response_mask_bs`` is 0 (prompt, image, padding) contribute exactly 0, even if
  their token log-prob is ``-inf`` or NaN.
  """
  if token_logp_bs.shape != response_mask_bs.shape:
    raise ValueError(f'response_mask_bs: shape {tuple(response_mask_bs.shape)} != token_logp_bs '
                     f'shape {tuple(token_logp_bs.shape)}')
  keep_bs = response_mask_bs > 0
  return jnp.sum(jnp.where(keep_bs, token_logp_bs.astype(jnp.float32), 0.0), axis=-1)


def per_sequence_loss(logp: jax.Array, logp_ref: jax.Array, advantage: jax.Array,
                      tau: float) -> jax.Array:
  """``-stop_grad(advantage) * logp + tau / 2 * (logp - stop_grad(logp_ref))^2``, elementwise
  (any shape; fp32). The RL task applies it to rows whose advantages were computed on the host."""
  logp = logp.astype(jnp.float32)
  d = logp - jax.lax.stop_gradient(logp_ref.astype(jnp.float32))
  return -jax.lax.stop_gradient(advantage.astype(jnp.float32)) * logp + 0.5 * tau * jnp.square(d)


def _check(logp_pk, logp_ref_pk, r_pk):
  if logp_pk.ndim != 2:
    raise ValueError(f'logp_pk: expected shape [prompts, k], got {tuple(logp_pk.shape)}')
  for name, x in (('logp_ref_pk', logp_ref_pk), ('r_pk', r_pk)):
    if x.shape != logp_pk.shape:
      raise ValueError(f'{name}: shape {tuple(x.shape)} != logp_pk shape {tuple(logp_pk.shape)}')


def _terms(logp_pk, logp_ref_pk, r_pk):
  """(logp, advantage a_pk, log ratio d_pk), fp32; r and logp_ref are constants."""
  logp_pk = logp_pk.astype(jnp.float32)
  logp_ref_pk = jax.lax.stop_gradient(logp_ref_pk.astype(jnp.float32))
  r_pk = jax.lax.stop_gradient(r_pk.astype(jnp.float32))
  adv_pk = r_pk - jnp.mean(r_pk, axis=-1, keepdims=True)
  return logp_pk, r_pk, adv_pk, logp_pk - logp_ref_pk


def mirror_descent_loss(logp_pk: jax.Array, logp_ref_pk: jax.Array, r_pk: jax.Array,
                        tau: float) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Per-sequence mirror-descent loss (scalar, mean over all P*k sequences) and metrics.

  Metrics (scalars): ``reward_mean``, ``advantage_abs_mean`` (|r - mean r|), ``log_ratio_mean``
  (logp - logp_ref, nats) and ``log_ratio_sq_mean`` (its square: a KL-like drift measure).
  """
  _check(logp_pk, logp_ref_pk, r_pk)
  logp_pk, r_pk, adv_pk, d_pk = _terms(logp_pk, logp_ref_pk, r_pk)
  loss_pk = per_sequence_loss(logp_pk, logp_ref_pk, adv_pk, tau)
  d_const = jax.lax.stop_gradient(d_pk)
  metrics = {
      'reward_mean': jnp.mean(r_pk),
      'advantage_abs_mean': jnp.mean(jnp.abs(adv_pk)),
      'log_ratio_mean': jnp.mean(d_const),
      'log_ratio_sq_mean': jnp.mean(jnp.square(d_const)),
  }
  return jnp.mean(loss_pk), metrics


def squared_surrogate(logp_pk: jax.Array, logp_ref_pk: jax.Array, r_pk: jax.Array,
                      tau: float) -> jax.Array:
  """The paper's surrogate ``mean_p mean_j (r - mean r - tau * (logp - logp_ref))^2`` (scalar)."""
  _check(logp_pk, logp_ref_pk, r_pk)
  _, _, adv_pk, d_pk = _terms(logp_pk, logp_ref_pk, r_pk)
  return jnp.mean(jnp.square(adv_pk - tau * d_pk))
