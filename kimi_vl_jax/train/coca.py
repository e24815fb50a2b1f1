"""CoCa-style heads for MoonViT pretraining: ``L = L_siglip + 2 * L_caption`` (SPEC §6).

Given MoonViT's patch features of one image per example, ``CocaHeads`` adds
- a small text encoder (bidirectional transformer over the caption, mean-pooled) and an image
  pooler (masked mean over patches), both projected to a shared embedding for the SigLIP loss
  (``siglip.py``) with learnable temperature and bias;
- a small caption decoder (causal self-attention + cross-attention to the patch features) trained
  with next-token cross-entropy on the caption.

Only the vision tower's parameters carry over to the joint stages (loaded by parameter path, see
``stages.transfer_params``); these heads are discarded after ViT pretraining.

Shapes: B examples, P patch slots, T caption tokens, D head width, V caption vocabulary.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import FrozenConfigDict

from kimi_vl_jax.models.norms import LayerNorm
from kimi_vl_jax.train import losses, siglip

_INIT = nn.initializers.normal(0.02)


def _dense(features: int, axes, name: str):
  return nn.Dense(features, kernel_init=nn.with_logical_partitioning(_INIT, axes), name=name)


def _layer_norm(name: str):
  return LayerNorm(epsilon=1e-5, name=name)


def masked_attention(q_bthk, k_bshk, v_bshk, mask_bts):
  """Dense softmax attention with a boolean mask (rows with no valid key output zeros).

  The caption side is short (tens of tokens), so a dense [B, H, T, S] score tensor is small.
  """
  scale = q_bthk.shape[-1] ** -0.5
  s = jnp.einsum('bthk,bshk->bhts', q_bthk, k_bshk).astype(jnp.float32) * scale
  s = jnp.where(mask_bts[:, None], s, -1e30)
  p = jax.nn.softmax(s, axis=-1) * mask_bts[:, None].any(-1, keepdims=True)
  return jnp.einsum('bhts,bshk->bthk', p.astype(v_bshk.dtype), v_bshk)


class _Attention(nn.Module):
  width: int
  heads: int

  @nn.compact
  def __call__(self, x_btd, kv_bsd, mask_bts):
    hd = self.width // self.heads
    q = _dense(self.width, ('embed', 'mlp'), 'q')(x_btd).reshape(*x_btd.shape[:2], self.heads, hd)
    k = _dense(self.width, ('embed', 'mlp'), 'k')(kv_bsd).reshape(*kv_bsd.shape[:2], self.heads, hd)
    v = _dense(self.width, ('embed', 'mlp'), 'v')(kv_bsd).reshape(*kv_bsd.shape[:2], self.heads, hd)
    o = masked_attention(q, k, v, mask_bts).reshape(*x_btd.shape[:2], self.width)
    return _dense(self.width, ('mlp', 'embed'), 'o')(o)


class _Block(nn.Module):
  width: int
  heads: int
  mlp: int
  cross: bool

  @nn.compact
  def __call__(self, x_btd, self_mask_btt, mem_bsd=None, cross_mask_bts=None):
    h = _layer_norm('ln_self')(x_btd)
    x_btd = x_btd + _Attention(self.width, self.heads, name='self_attn')(h, h, self_mask_btt)
    if self.cross:
      h = _layer_norm('ln_cross')(x_btd)
      x_btd = x_btd + _Attention(self.width, self.heads, name='cross_attn')(h, mem_bsd, cross_mask_bts)
    h = _layer_norm('ln_mlp')(x_btd)
    h = nn.gelu(_dense(self.mlp, ('embed', 'mlp'), 'fc0')(h), approximate=True)
    return x_btd + _dense(self.width, ('mlp', 'embed'), 'fc1')(h)


class _TextTower(nn.Module):
  """Token + position embedding and a stack of blocks (causal and with cross-attn for the decoder)."""
  config: FrozenConfigDict
  causal: bool
  cross: bool

  @nn.compact
  def __call__(self, tokens_bt, mask_bt, mem_bsd=None, mem_mask_bs=None):
    c = self.config
    t = tokens_bt.shape[1]
    emb = nn.Embed(c.vocab_size, c.width, name='embed',
                   embedding_init=nn.with_logical_partitioning(_INIT, ('vocab', 'embed')))
    pos = self.param('pos_embed', nn.with_logical_partitioning(_INIT, (None, 'embed')),
                     (c.max_len, c.width))
    x = emb(tokens_bt) + pos[None, :t]
    valid = mask_bt > 0
    self_mask = valid[:, :, None] & valid[:, None, :]
    if self.causal:
      self_mask &= jnp.tril(jnp.ones((t, t), bool))[None]
    cross_mask = None
    if self.cross:
      cross_mask = valid[:, :, None] & (mem_mask_bs > 0)[:, None, :]
    for i in range(c.layers):
      x = _Block(c.width, c.heads, c.mlp, self.cross, name=f'block_{i}')(x, self_mask, mem_bsd, cross_mask)
    return _layer_norm('ln_final')(x), emb


class CocaHeads(nn.Module):
  """Contrastive + captioning heads on top of image patch features.

  ``config`` fields: vocab_size, width, layers, heads, mlp, max_len, embed_dim (the SigLIP space).
  """
  config: FrozenConfigDict
  num_sources: int = 0      # K: caption loss sums per data source when source ids are given

  @nn.compact
  def __call__(self, feats_bpd, patch_mask_bp, caption_bt, caption_mask_bt, source_ids_b=None):
    """Returns {'siglip': scalar, 'caption': mean caption NLL per token, 'caption_loss_sum',
    'caption_weight_sum', 'source_loss_sum' [K], 'source_weight_sum' [K], 'loss', and the
    SigLIP inputs 'zimg' [B, E], 'ztxt' [B, E], 'valid' [B] (1.0 for examples with an image)}.

    'siglip' is over these B examples; a step that accumulates microbatches recomputes it over
    the whole batch from the SigLIP inputs (``tasks.vit_pretrain_task``).

    Args:
      feats_bpd: vision features of one image per example (padding slots arbitrary).
      patch_mask_bp: 1 for real patches.
      caption_bt: int caption tokens (BOS ... EOS, then padding).
      caption_mask_bt: 1 for real caption tokens.
      source_ids_b: optional int source index in [0, K) of each example.
    """
    c = self.config
    pm = patch_mask_bp.astype(jnp.float32)
    pooled_bd = jnp.sum(feats_bpd * pm[..., None], 1) / jnp.maximum(pm.sum(1, keepdims=True), 1.0)
    zimg = _dense(c.embed_dim, ('embed', 'mlp'), 'img_proj')(pooled_bd)

    txt, _ = _TextTower(c, causal=False, cross=False, name='text_encoder')(caption_bt, caption_mask_bt)
    tm = caption_mask_bt.astype(jnp.float32)
    ztxt = _dense(c.embed_dim, ('embed', 'mlp'), 'txt_proj')(
        jnp.sum(txt * tm[..., None], 1) / jnp.maximum(tm.sum(1, keepdims=True), 1.0))
    t_prime = self.param('log_temperature', nn.initializers.constant(siglip.INIT_LOG_TEMPERATURE), ())
    bias = self.param('bias', nn.initializers.constant(siglip.INIT_BIAS), ())
    valid_n = pm.sum(1) > 0
    l_siglip = siglip.siglip_loss(zimg, ztxt, t_prime, bias, valid_n)

    mem = _dense(c.width, ('embed', 'mlp'), 'mem_proj')(feats_bpd)
    dec, emb = _TextTower(c, causal=True, cross=True, name='caption_decoder')(
        caption_bt, caption_mask_bt, mem, patch_mask_bp)
    logits = emb.attend(dec)
    seg = (caption_mask_bt > 0).astype(jnp.int32)
    targets, weights = losses.shift_targets(caption_bt, caption_mask_bt, seg)
    nll = losses.cross_entropy_from_logits(logits, targets)
    src_bt = None if source_ids_b is None else jnp.broadcast_to(source_ids_b[:, None], nll.shape)
    sums = losses.weighted_sums(nll, weights, src_bt, self.num_sources)
    caption = sums['loss_sum'] / jnp.maximum(sums['weight_sum'], 1.0)
    return {'siglip': l_siglip, 'caption': caption,
            'caption_loss_sum': sums['loss_sum'], 'caption_weight_sum': sums['weight_sum'],
            'source_loss_sum': sums['source_loss_sum'],
            'source_weight_sum': sums['source_weight_sum'],
            'loss': l_siglip + 2.0 * caption,
            'zimg': zimg, 'ztxt': ztxt, 'valid': valid_n.astype(jnp.float32)}
