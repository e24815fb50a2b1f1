"""Common record -> ``Example``: images preprocessed to patches, text to ids and a loss mask.

Image failures become ``BadRecord`` reasons (the record's ``file:line`` and the image named):
missing file -> ``missing_image``; undecodable -> ``corrupt_image``; grid at the per-side
limit, decompression bombs, more images or patches than one packed row holds ->
``image_beyond_limits``. Template failures (roles, empty, counts) keep their reasons.
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Any

import numpy as np
from PIL import Image

from kimi_vl_jax.data import chat_template
from kimi_vl_jax.data import image_processor as ip
from kimi_vl_jax.data.sources.base import BadRecord
from kimi_vl_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass
class Example:
  """One tokenized example, ready to pack.

  tokens: [T] int32; loss_mask: [T] int32 (1 = this token is a training target);
  patches: per image, [h*w, 3*14*14] float32 in raster order; grids: per image (h, w);
  source_id: index of the source in the mixture; origin: 'file:line'; index: stream index.
  """
  tokens: np.ndarray
  loss_mask: np.ndarray
  patches: list
  grids: list
  source_id: int
  origin: str
  index: int = -1

  @property
  def num_tokens(self) -> int:
    return int(self.tokens.shape[0])

  @property
  def num_patches(self) -> int:
    return sum(h * w for h, w in self.grids)


@dataclasses.dataclass(frozen=True)
class ExampleLimits:
  max_images: int = 64            # per example
  max_patches: int = 1 << 30      # per example: at most what one packed row's patch buffer holds


def _image_refs(record: dict) -> list:
  if record['kind'] == 'document':
    return [it['image'] for it in record['items'] if it['type'] == 'image']
  return [it['image'] for m in record['messages']
          for it in chat_template.content_items(m) if it['type'] == 'image']


def _process(ref: Any, k: int, cfg: ip.ImageProcessorConfig, origin: str) -> ip.ProcessedImage:
  name = ref if isinstance(ref, str) else f'image[{k}]'
  try:
    if isinstance(ref, (bytes, bytearray)):
      with Image.open(io.BytesIO(ref)) as opened:
        opened.load()
        ref = opened.copy()
    elif isinstance(ref, str) and not os.path.isfile(ref):
      raise BadRecord('missing_image', f'{name}: file not found', origin)
    return ip.process_image(ref, cfg, name=name)
  except Image.DecompressionBombError as e:
    raise BadRecord('image_beyond_limits', f'{name}: {e}', origin) from None
  except ip.ImageProcessingError as e:
    msg = str(e)
    reason = ('image_beyond_limits' if 'limit' in msg else
              'missing_image' if 'cannot read file' in msg else 'corrupt_image')
    raise BadRecord(reason, msg, origin) from None
  except (OSError, ValueError, SyntaxError) as e:     # undecodable bytes
    raise BadRecord('corrupt_image', f'{name}: {e}', origin) from None


def build_example(record: dict, tokenizer: Tokenizer, image_cfg: ip.ImageProcessorConfig,
                  source_id: int = 0, limits: ExampleLimits = ExampleLimits(),
                  index: int = -1) -> Example:
  """Raises BadRecord (with the record's origin) for anything that cannot be trained on."""
  origin = record.get('origin', '')
  refs = _image_refs(record)
  if len(refs) > limits.max_images:
    raise BadRecord('image_beyond_limits', f'{len(refs)} images > max_images {limits.max_images}',
                    origin)
  images = [_process(ref, k, image_cfg, origin) for k, ref in enumerate(refs)]
  grids = [im.grid_hw for im in images]
  total = sum(h * w for h, w in grids)
  if total > limits.max_patches:
    raise BadRecord('image_beyond_limits', f'{total} patches > the {limits.max_patches} a packed '
                    'row holds', origin)
  mh, mw = image_cfg.merge_kernel_size
  counts = [(h // mh) * (w // mw) for h, w in grids]
  try:
    if record['kind'] == 'chat':
      ids, mask = chat_template.encode_chat(record['messages'], tokenizer, counts)
    else:
      ids, mask = chat_template.encode_document(record['items'], tokenizer, counts)
  except chat_template.TemplateError as e:
    msg = str(e)
    reason = ('unknown_role' if 'unknown role' in msg else
              'empty_conversation' if 'empty' in msg else
              'image_count_mismatch' if 'image' in msg else 'invalid_record')
    raise BadRecord(reason, msg, origin) from None
  return Example(tokens=ids, loss_mask=mask, patches=[im.patches for im in images], grids=grids,
                 source_id=source_id, origin=origin, index=index)
