"""Tasks: what a stage trains, as ``step.Task`` (init + loss over a host batch).

- ``lm``: the MoE LM on token rows (text-only stages and unit tests).
- ``kimi_vl``: MoonViT + projector + LM on rows with packed images (joint stages and SFT).
- ``vit_pretrain``: MoonViT + CoCa heads on image/caption pairs (``L_siglip + 2 L_caption``).

Batch keys (host numpy, leading axis B):
  tokens, segment_ids, positions, loss_mask, source_ids: [B, S] int32 (LM rows);
  patches [B, P, 588] float32 and patch_segment_ids, patch_rows, patch_cols, patch_grid_h,
  patch_grid_w [B, P] int32 (``data/pipeline.py``);
  caption, caption_mask: [B, T] int32 and source_ids [B] int32 (vit_pretrain only).

The LM loss is next-token CE over ``loss_mask``-ed targets (``losses.shift_targets``) plus
``seq_balance_loss_alpha * balance_loss``. With ``train.loss_vocab_chunk > 0`` the CE is computed
chunk by chunk over the vocabulary (and, with ``train.loss_token_chunk > 0``, over sequence
slices) from the final hidden states (``losses.chunked_cross_entropy``):
the LM's final hidden states are recorded (``apply_with_hidden``) and the unused logits are
dropped by XLA, so full logits never exist.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import FrozenConfigDict

from kimi_vl_jax.train import losses, siglip
from kimi_vl_jax.train.coca import CocaHeads
from kimi_vl_jax.train.step import CoupledLoss, Task

LM_KEYS = ('tokens', 'segment_ids', 'positions', 'loss_mask', 'source_ids')
PATCH_KEYS = ('patches', 'patch_segment_ids', 'patch_rows', 'patch_cols', 'patch_grid_h',
              'patch_grid_w')


def apply_with_hidden(model, variables, args, kwargs):
  """``model.apply`` that also returns the LM's final normed hidden states [B, S, D].

  The output of the MoeLM's final ``norm`` is recorded by a method interceptor, so any model
  that contains a MoeLM works. When the caller then ignores the logits, XLA drops the lm_head
  matmul (dead code under jit): the full [B, S, V] logits are never computed.
  """
  from kimi_vl_jax.models.lm import MoeLM
  seen = []

  def record(next_fun, a, kw, context):
    out = next_fun(*a, **kw)
    if (context.method_name == '__call__' and context.module.name == 'norm'
        and isinstance(context.module.parent, MoeLM)):
      seen.append(out)
    return out

  with nn.intercept_methods(record):
    logits, aux = model.apply(variables, *args, **kwargs)
  if len(seen) != 1:
    raise ValueError(f'expected one MoeLM final norm call, saw {len(seen)}')
  return logits, seen[0], aux


def lm_objective(logits_or_hidden, lm_head_kernel, batch, aux, lm_cfg, vocab_chunk: int,
                 num_sources: int, token_chunk: int = 0):
  """(objective_sum, aux) of the LM part; ``logits_or_hidden`` is hidden iff vocab_chunk > 0."""
  targets, weights = losses.shift_targets(batch['tokens'], batch['loss_mask'], batch['segment_ids'])
  if vocab_chunk > 0:
    nll = losses.chunked_cross_entropy(logits_or_hidden, lm_head_kernel, targets,
                                       chunk_size=vocab_chunk, token_chunk=token_chunk,
                                       soft_cap=float(lm_cfg.logits_soft_cap),
                                       compute_dtype=jnp.dtype(lm_cfg.dtype))
  else:
    nll = losses.cross_entropy_from_logits(logits_or_hidden, targets)
  sums = losses.weighted_sums(nll, weights, batch.get('source_ids'), num_sources)
  balance = aux.get('balance_loss', jnp.zeros((), jnp.float32))
  alpha = float(lm_cfg.seq_balance_loss_alpha)
  objective = sums['loss_sum'] + alpha * balance * sums['weight_sum']
  out = {'denom': sums['weight_sum'], 'source_loss_sum': sums['source_loss_sum'],
         'source_weight_sum': sums['source_weight_sum']}
  if 'load_le' in aux and aux['load_le'].size:
    out['load_le'] = aux['load_le']
    out['dropped'] = aux['dropped'].astype(jnp.float32)
  return objective, {'sums': out, 'means': {'balance_loss': balance}}


def _apply_lm_like(model, variables, args, kwargs, vocab_chunk: int):
  """(logits or, with vocab_chunk > 0, hidden states; aux)."""
  if vocab_chunk > 0:
    _, hidden, aux = apply_with_hidden(model, variables, args, kwargs)
    return hidden, aux
  return model.apply(variables, *args, **kwargs)


def _lm_head_kernel(params):
  if 'lm_head' in params:
    return params['lm_head']['kernel']
  return params['language_model']['lm_head']['kernel']


def lm_task(model_cfg, train_cfg, source_names=()) -> Task:
  from kimi_vl_jax.models.lm import MoeLM
  lm_cfg = FrozenConfigDict(model_cfg.lm)
  model = MoeLM(lm_cfg)
  chunk = int(train_cfg.get('loss_vocab_chunk', 0))
  token_chunk = int(train_cfg.get('loss_token_chunk', 0))
  k = len(source_names)

  def init(rng):
    z = jnp.zeros((1, 8), jnp.int32)
    return model.init(rng, z, jnp.ones_like(z), z)

  def loss(params, extra, batch, rng):
    del rng
    out, aux = _apply_lm_like(model, {'params': params, **extra},
                              (batch['tokens'], batch['segment_ids'], batch['positions']), {}, chunk)
    return lm_objective(out, _lm_head_kernel(params), batch, aux, lm_cfg, chunk, k, token_chunk)

  return Task('lm', init, loss, tuple(source_names), model, lm_cfg)


def kimi_vl_task(model_cfg, train_cfg, source_names=(), media_pad_id: int = 0) -> Task:
  from kimi_vl_jax.models.kimi_vl import KimiVL, dummy_inputs
  cfg = FrozenConfigDict(model_cfg)
  model = KimiVL(cfg, media_pad_id=media_pad_id)
  chunk = int(train_cfg.get('loss_vocab_chunk', 0))
  token_chunk = int(train_cfg.get('loss_token_chunk', 0))
  k = len(source_names)

  def init(rng):
    return model.init(rng, **dummy_inputs(cfg, media_pad_id))

  def loss(params, extra, batch, rng):
    del rng
    args = (batch['tokens'], batch['segment_ids'], batch['positions'])
    kwargs = {key: batch[key] for key in PATCH_KEYS if key in batch}
    out, aux = _apply_lm_like(model, {'params': params, **extra}, args, kwargs, chunk)
    return lm_objective(out, _lm_head_kernel(params), batch, aux, cfg.lm, chunk, k, token_chunk)

  return Task('kimi_vl', init, loss, tuple(source_names), model, cfg)


class VitPretrainModel(nn.Module):
  """MoonViT (parameters under ``vision_tower``, as in Kimi-VL) + CoCa heads."""
  config: FrozenConfigDict   # the model block (vision) + coca head block
  num_sources: int = 0

  @nn.compact
  def __call__(self, patches, patch_segment_ids, rows, cols, grid_h, grid_w, caption, caption_mask,
               source_ids=None):
    from kimi_vl_jax.models.moonvit import MoonViT
    feats = MoonViT(self.config.vision, name='vision_tower')(
        patches, patch_segment_ids, rows, cols, grid_h, grid_w)
    # One image per example in this stage: every real patch belongs to segment 1.
    return CocaHeads(self.config.coca, self.num_sources, name='coca')(
        feats.astype(jnp.float32), (patch_segment_ids > 0).astype(jnp.int32), caption, caption_mask,
        source_ids)


def vit_pretrain_task(model_cfg, num_patches: int = 16, caption_len: int = 8,
                      source_names=()) -> Task:
  """MoonViT + CoCa heads: ``L = L_siglip + 2 * L_caption``.

  The objective sum is ``2 * caption NLL sum + L_siglip * denom`` with ``denom`` the caption
  target tokens, so the step's ``objective / denom`` is that L with the caption NLL per token of
  the whole batch. SigLIP pairs every image with every caption of the batch, so it is the task's
  ``coupled`` term: a step that accumulates microbatches still takes its negatives from the
  whole batch (``step.py``). With ``source_names`` and a batch ``source_ids [B]``, the step's
  ``source_loss`` metrics are the caption NLL per token of each source (SigLIP has no
  per-source share)."""
  cfg = FrozenConfigDict({'vision': model_cfg.vision.to_dict(), 'coca': model_cfg.coca.to_dict()})
  model = VitPretrainModel(cfg, num_sources=len(source_names))
  patch_dim = cfg.vision.num_channels * cfg.vision.patch_size ** 2

  def init(rng):
    seg = jnp.ones((1, num_patches), jnp.int32)
    grid = jnp.full((1, num_patches), 2, jnp.int32)
    cap = jnp.ones((1, caption_len), jnp.int32)
    return model.init(rng, jnp.zeros((1, num_patches, patch_dim)), seg, seg * 0, seg * 0, grid, grid,
                      cap, cap)

  def split(params, extra, batch, rng):
    """(2 * caption NLL sum, aux, SigLIP inputs {'zimg', 'ztxt', 'valid'})."""
    del rng
    out = model.apply({'params': params, **extra}, *(batch[k] for k in PATCH_KEYS),
                      batch['caption'], batch['caption_mask'], batch.get('source_ids'))
    sums = {'denom': out['caption_weight_sum']}
    if source_names:
      sums.update(source_loss_sum=out['source_loss_sum'],
                  source_weight_sum=out['source_weight_sum'])
    embeddings = {k: out[k] for k in ('zimg', 'ztxt', 'valid')}
    return 2.0 * out['caption_loss_sum'], {'sums': sums, 'means': {'caption': out['caption']}}, \
        embeddings

  def siglip_objective(params, embeddings, sums):
    coca = params['coca']
    value = siglip.siglip_loss(embeddings['zimg'], embeddings['ztxt'], coca['log_temperature'],
                               coca['bias'], embeddings['valid'] > 0)
    return value * sums['denom'].astype(jnp.float32), {'siglip': value}

  def loss(params, extra, batch, rng):
    local, aux, embeddings = split(params, extra, batch, rng)
    coupled, means = siglip_objective(params, embeddings, aux['sums'])
    return local + coupled, {**aux, 'means': {**aux['means'], **means}}

  return Task('vit_pretrain', init, loss, tuple(source_names), model, cfg,
              coupled=CoupledLoss(split, siglip_objective))


def host_batch_tokens(batch: dict) -> int:
  """Real (non-padding) tokens in a host batch, for tokens-seen and throughput."""
  if 'segment_ids' in batch:
    return int(np.count_nonzero(batch['segment_ids']))
  return int(np.count_nonzero(batch.get('caption_mask', 0)))
