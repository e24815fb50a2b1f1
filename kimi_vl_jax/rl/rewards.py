"""Rewards for the RL stage: a verifier's 0/1 correctness plus the k1.5 length penalty.

The verifier is the problem's own (``data/generated/scoring.is_correct``: exact match, numeric
``verify``, click-in-box, or a user problem's multiple choice); this module shapes its verdicts.

Shapes: ``P`` prompts, ``k`` sampled responses per prompt; ``len_pk`` counts response tokens
(int or float), ``correct_pk`` is the verifier's verdict in {0, 1} (bool or float). Rewards are
unitless float32.

Length penalty (among the k responses of one prompt row): with ``min_len``/``max_len`` the row's
shortest/longest response, ``lam_j = 0.5 - (len_j - min_len) / (max_len - min_len)`` (0 for the
whole row when ``max_len == min_len``); a correct response adds ``lam_j``, a wrong one adds
``min(0, lam_j)``, so being short never rescues a wrong answer. ``shaped_rewards`` scales it by a
config weight and a warm-up switch that may be a traced value.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

def _check_pk(name: str, x: jax.Array):
  if x.ndim != 2:
    raise ValueError(f'{name}: expected shape [prompts, k], got {tuple(x.shape)}')


def length_penalty(len_pk: jax.Array, correct_pk: jax.Array) -> jax.Array:
  """Per-sample additive length term (not yet weighted), float32 [P, k].

  ``lam`` is computed per prompt row (0 where the row's lengths are all equal); correct samples
  get ``lam``, wrong ones ``min(0, lam)``.
  """
  len_pk = jnp.asarray(len_pk, jnp.float32)
  correct_pk = jnp.asarray(correct_pk)
  _check_pk('len_pk', len_pk)
  if correct_pk.shape != len_pk.shape:
    raise ValueError(f'correct_pk: shape {tuple(correct_pk.shape)} != len_pk shape '
                     f'{tuple(len_pk.shape)}')
  min_p1 = jnp.min(len_pk, axis=-1, keepdims=True)
  max_p1 = jnp.max(len_pk, axis=-1, keepdims=True)
  span_p1 = max_p1 - min_p1
  same_p1 = span_p1 == 0
  lam_pk = 0.5 - (len_pk - min_p1) / jnp.where(same_p1, 1.0, span_p1)
  lam_pk = jnp.where(same_p1, 0.0, lam_pk)
  return jnp.where(correct_pk > 0, lam_pk, jnp.minimum(lam_pk, 0.0))


def shaped_rewards(correct_pk: jax.Array, len_pk: jax.Array, weight: float,
                   active) -> jax.Array:
  """``r_pk = correct + weight * active * length_penalty``, float32 [P, k].

  ``active`` is a bool or 0/1 scalar (may be traced): the length-penalty warm-up switch.
  """
  active = jnp.asarray(active, jnp.float32)
  lp_pk = length_penalty(len_pk, correct_pk)
  return jnp.asarray(correct_pk, jnp.float32) + jnp.float32(weight) * active * lp_pk
