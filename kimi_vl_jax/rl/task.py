"""The RL stage's ``step.Task``: online policy mirror descent over rollout rows (SPEC §5).

Each row is one sampled response (``rollout.training_rows``); its sequence log-probability
``logp_b`` is the sum of the response tokens' log-probabilities (``loss_mask``). With the
baseline-subtracted reward ``rl_advantage`` = r - mean_k(r) and the reference policy's
``rl_ref_logp`` (the policy that sampled, fixed for the iteration), the per-row loss is

    -advantage_b * logp_b + tau / 2 * (logp_b - ref_logp_b)^2

(``objective.per_sequence_loss``), whose gradient is that of the squared surrogate of SPEC §5
up to the factor 2 tau (``objective.py``). The task returns
the sum over real rows (``rl_weight``) and their count as the denominator, so the train step
(``step.make_train_step``: microbatches, clipping, the optimizer, router-bias update) minimizes
the mean over rows unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kimi_vl_jax.rl import objective
from kimi_vl_jax.train import losses
from kimi_vl_jax.train import tasks as tasks_lib
from kimi_vl_jax.train.step import Task

def sequence_logp(task: Task, params, extra, batch, vocab_chunk: int = 0,
                  token_chunk: int = 0):
  """(logp_b fp32 [B]: summed log-probabilities of each row's ``loss_mask`` tokens, model aux)."""
  args = (batch['tokens'], batch['segment_ids'], batch['positions'])
  kwargs = {k: batch[k] for k in tasks_lib.PATCH_KEYS if k in batch}
  out, aux = tasks_lib._apply_lm_like(task.model, {'params': params, **extra}, args, kwargs,
                                      vocab_chunk)
  targets, weights = losses.shift_targets(batch['tokens'], batch['loss_mask'],
                                          batch['segment_ids'])
  lm_cfg = task.model_config.lm if 'lm' in task.model_config else task.model_config
  if vocab_chunk > 0:
    nll = losses.chunked_cross_entropy(out, tasks_lib._lm_head_kernel(params), targets,
                                       chunk_size=vocab_chunk, token_chunk=token_chunk,
                                       soft_cap=float(lm_cfg.logits_soft_cap),
                                       compute_dtype=jnp.dtype(lm_cfg.dtype))
  else:
    nll = losses.cross_entropy_from_logits(out, targets, soft_cap=float(lm_cfg.logits_soft_cap))
  return objective.sequence_logprobs(-nll, weights), aux


def rl_task(base: Task, train_cfg, tau: float) -> Task:
  """The policy-mirror-descent objective on the model of ``base`` (an lm or kimi_vl task)."""
  vocab_chunk = int(train_cfg.get('loss_vocab_chunk', 0))
  token_chunk = int(train_cfg.get('loss_token_chunk', 0))

  def loss(params, extra, batch, rng):
    del rng
    logp, aux = sequence_logp(base, params, extra, batch, vocab_chunk, token_chunk)
    w = batch['rl_weight'].astype(jnp.float32)
    per_row = objective.per_sequence_loss(logp, batch['rl_ref_logp'], batch['rl_advantage'], tau)
    ratio = jax.lax.stop_gradient(logp - batch['rl_ref_logp'].astype(jnp.float32))
    sums = {'denom': jnp.sum(w),
            'source_loss_sum': jnp.zeros((0,), jnp.float32),
            'source_weight_sum': jnp.zeros((0,), jnp.float32)}
    if 'load_le' in aux and aux['load_le'].size:
      sums['load_le'] = aux['load_le']
      sums['dropped'] = aux['dropped'].astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    means = {'rl_log_ratio': jnp.sum(w * ratio) / n,
             'rl_log_ratio_sq': jnp.sum(w * jnp.square(ratio)) / n,
             'rl_logp': jnp.sum(w * logp) / n}
    return jnp.sum(w * per_row), {'sums': sums, 'means': means}

  return Task('rl', base.init, loss, (), base.model, base.model_config)
