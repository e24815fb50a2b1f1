"""Kimi-VL: MoonViT -> projector -> image tokens at ``<|media_pad|>`` positions -> MoE LM.

Shapes are static: a row of S text tokens comes with a buffer of P patch slots
(``data/patch_packing.py``) holding that row's images in token order. The vision tower and
projector turn the buffer into P/4 image tokens whose first ``n`` are the row's real image
tokens, in image order and raster order within an image (SPEC §2.5). The k-th
``<|media_pad|>`` token of the row (counting from the left) takes image token k: a cumsum and
a gather, no data-dependent shapes. Image tokens keep ordinary 1-D positions (as in the
release).

A mismatch between placeholders and image tokens would silently misalign text and images on
device, so it is checked on the host (``check_image_placeholders``): automatically when the
model is called with concrete arrays, and by the data pipeline / train step before ``jit``.

Variables: ``params`` {vision_tower, multi_modal_projector, language_model} and ``router``
{language_model} (names follow the release's checkpoint prefixes, SPEC §3.3).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import FrozenConfigDict

from kimi_vl_jax.models.lm import MoeLM
from kimi_vl_jax.models.moonvit import MoonViT
from kimi_vl_jax.models.projector import Projector

try:  # the data engineer's single source of special tokens
  from kimi_vl_jax.data.special_tokens import MEDIA_PAD, RELEASED_IDS
  RELEASED_MEDIA_PAD_ID = RELEASED_IDS[MEDIA_PAD]
except ImportError:  # pragma: no cover - only while that module is absent
  RELEASED_MEDIA_PAD_ID = 163605

PATCH_KEYS = ('patches', 'patch_segment_ids', 'patch_rows', 'patch_cols', 'patch_grid_h',
              'patch_grid_w')


class PlaceholderMismatchError(ValueError):
  """The <|media_pad|> count of a row differs from its number of image tokens."""


def check_image_placeholders(tokens_bs, patch_segment_ids_bp, media_pad_id: int,
                             merge_area: int = 4) -> None:
  """Host check: per row, #<|media_pad|> tokens == #image tokens in its patch buffer.

  Args:
    tokens_bs: int [B, S] token ids (numpy or concrete jax arrays).
    patch_segment_ids_bp: int [B, P] patch slot image ids (0 = empty), or None (text only).
    media_pad_id: the <|media_pad|> id of the tokenizer in use.
  Raises:
    PlaceholderMismatchError naming the row and both counts.
  """
  tokens = np.asarray(tokens_bs)
  pads = (tokens == media_pad_id).sum(axis=1)
  if patch_segment_ids_bp is None:
    image_tokens = np.zeros_like(pads)
  else:
    seg = np.asarray(patch_segment_ids_bp)
    if seg.shape[0] != tokens.shape[0]:
      raise PlaceholderMismatchError(f'tokens have {tokens.shape[0]} rows but the patch buffer '
                                     f'has {seg.shape[0]}')
    image_tokens = (seg > 0).sum(axis=1) // merge_area
  bad = np.nonzero(pads != image_tokens)[0]
  if bad.size:
    r = int(bad[0])
    raise PlaceholderMismatchError(
        f'row {r}: {int(pads[r])} <|media_pad|> tokens (id {media_pad_id}) but {int(image_tokens[r])} '
        f'image tokens in its patch buffer ({bad.size} mismatched rows); each image needs '
        f'(h/2)*(w/2) placeholders in image order')


def merge_image_tokens(text_bsd: jax.Array, image_btd: jax.Array, is_pad_bs: jax.Array) -> jax.Array:
  """Puts image token k of each row at the row's k-th placeholder (static shapes).

  text_bsd [B, S, D], image_btd [B, T, D], is_pad_bs bool [B, S] -> [B, S, D].
  """
  k_bs = jnp.cumsum(is_pad_bs.astype(jnp.int32), axis=1) - 1
  k_bs = jnp.clip(k_bs, 0, image_btd.shape[1] - 1)
  gathered = jnp.take_along_axis(image_btd, k_bs[..., None], axis=1)
  return jnp.where(is_pad_bs[..., None], gathered.astype(text_bsd.dtype), text_bsd)


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


class KimiVL(nn.Module):
  """``config``: the whole ``model`` block (lm, vision, projector). ``media_pad_id``: the
  <|media_pad|> token id (the project tokenizer's, or the release's 163605)."""
  config: FrozenConfigDict
  media_pad_id: int = RELEASED_MEDIA_PAD_ID

  def setup(self):
    cfg = self.config
    self.vision_tower = MoonViT(FrozenConfigDict(cfg.vision))
    self.multi_modal_projector = Projector(FrozenConfigDict(cfg.projector),
                                           dtype=cfg.vision.dtype,
                                           param_dtype=cfg.vision.param_dtype)
    self.language_model = MoeLM(FrozenConfigDict(cfg.lm))

  def image_tokens(self, patches, patch_segment_ids, patch_rows, patch_cols, patch_grid_h,
                   patch_grid_w):
    """Projected image tokens [B, P/4, D_lm] and their image ids [B, P/4] (0 = empty)."""
    feats = self.vision_tower(patches, patch_segment_ids, patch_rows, patch_cols, patch_grid_h,
                              patch_grid_w)
    return self.multi_modal_projector(feats, patch_segment_ids)

  def __call__(self, tokens_bs, segment_ids_bs, positions_bs, patches=None,
               patch_segment_ids=None, patch_rows=None, patch_cols=None, patch_grid_h=None,
               patch_grid_w=None, *, decode_cache: Optional[dict] = None,
               deterministic: bool = True):
    """Args:
      tokens_bs, segment_ids_bs, positions_bs: int [B, S] (see MoeLM).
      patches ... patch_grid_w: the row's patch buffer [B, P, 588] / [B, P] (see
        data/patch_packing.py), or all None for text-only batches.
    Returns:
      (logits [B, S, V] fp32, aux) with aux from MoeLM ({'load_le', 'dropped', 'balance_loss'}
      (+ 'cache')) plus 'image_tokens' (int32 count of real image tokens in the batch).
    """
    x_bsd = self.language_model.embed(tokens_bs)
    n_img = jnp.zeros((), jnp.int32)
    if patches is not None:
      if _is_concrete(tokens_bs) and _is_concrete(patch_segment_ids):
        check_image_placeholders(tokens_bs, patch_segment_ids, self.media_pad_id)
      img_btd, img_seg_bt = self.image_tokens(patches, patch_segment_ids, patch_rows, patch_cols,
                                              patch_grid_h, patch_grid_w)
      is_pad = (tokens_bs == self.media_pad_id) & (segment_ids_bs > 0)
      x_bsd = merge_image_tokens(x_bsd, img_btd, is_pad)
      n_img = jnp.sum(img_seg_bt > 0).astype(jnp.int32)
    logits_bsv, aux = self.language_model(tokens_bs, segment_ids_bs, positions_bs,
                                          inputs_embeds_bsd=x_bsd, decode_cache=decode_cache,
                                          deterministic=deterministic)
    aux = dict(aux)
    aux['image_tokens'] = n_img
    return logits_bsv, aux


def dummy_inputs(model_cfg, media_pad_id: int, batch: int = 1, length: int = 8,
                 num_patches: int = 4) -> dict:
  """Inputs for init: one 2x2 image (one image token, one placeholder) per row."""
  from kimi_vl_jax.models import moonvit
  patches, seg, rows, cols, gh, gw = moonvit.dummy_inputs(model_cfg.vision, batch, num_patches)
  tokens = jnp.ones((batch, length), jnp.int32).at[:, 1].set(media_pad_id)
  segment_ids = jnp.ones((batch, length), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  return dict(tokens_bs=tokens, segment_ids_bs=segment_ids, positions_bs=positions, patches=patches,
              patch_segment_ids=seg, patch_rows=rows, patch_cols=cols, patch_grid_h=gh,
              patch_grid_w=gw)
