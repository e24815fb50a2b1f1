"""Pack many variable-size images into one fixed-shape patch buffer per example.

Every example gets ``max_patches`` (P) patch slots, so one compiled step serves any mix of
image sizes. Images are laid out back to back from slot 0; the rest are empty slots.

Within an image, patches are stored in **2x2 merge-block order**: LM token (R, C) of an
image with grid (h, w) owns four consecutive slots holding patches (2R, 2C), (2R, 2C+1),
(2R+1, 2C), (2R+1, 2C+1), and tokens follow in raster order over (R, C) (SPEC §2.5). Every
image has an even grid, so it starts at a slot divisible by 4 and the pixel shuffle on
device is a plain reshape ``[P, D] -> [P/4, 4*D]``; the k-th LM image token of an example is
slot group k, in image order.

Per slot the pack records: ``segment_ids`` (1-based image index in the example, 0 = empty),
``rows``/``cols`` (the patch's coordinates in its image), ``grid_h``/``grid_w`` (its image's
patch grid; 0 for empty slots). MoonViT takes exactly these arrays.

Typical use (data pipeline)::

    imgs = [image_processor.process_image(x) for x in example_images]
    packed = pack_images(imgs, max_patches=4096)     # one example
    batch = stack_packs([packed_0, packed_1, ...])   # dict of [B, P, ...] arrays
    packed.num_tokens                                # LM <|media_pad|> copies per image
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import numpy as np

from kimi_vl_jax.data.image_processor import ProcessedImage

PATCH_FIELDS = ('patches', 'segment_ids', 'rows', 'cols', 'grid_h', 'grid_w')
ImageInput = Union[ProcessedImage, tuple]


class PackingError(ValueError):
  """Images do not fit the buffer, or an image is malformed; the message says which."""


def merge_block_coords(h: int, w: int, merge: tuple[int, int] = (2, 2)) -> tuple[np.ndarray, np.ndarray]:
  """(rows [h*w], cols [h*w]) of an (h, w) grid listed in merge-block order."""
  mh, mw = merge
  if h % mh or w % mw:
    raise PackingError(f'grid {h}x{w} is not divisible by the merge kernel {mh}x{mw}')
  # Index order (R, C, dr, dc) -> row = R*mh + dr, col = C*mw + dc.
  big_r, big_c, dr, dc = np.meshgrid(np.arange(h // mh), np.arange(w // mw), np.arange(mh),
                                     np.arange(mw), indexing='ij')
  return (big_r * mh + dr).reshape(-1).astype(np.int32), (big_c * mw + dc).reshape(-1).astype(np.int32)


def raster_to_merge_order(x_raster: np.ndarray, h: int, w: int,
                          merge: tuple[int, int] = (2, 2)) -> np.ndarray:
  """Reorders [h*w, ...] raster-ordered rows into merge-block order."""
  rows, cols = merge_block_coords(h, w, merge)
  return x_raster[rows * w + cols]


@dataclasses.dataclass(frozen=True)
class PackedImages:
  """One example's patch buffer (see module docstring). Shapes: [P, C*p*p] and [P]."""
  patches: np.ndarray
  segment_ids: np.ndarray
  rows: np.ndarray
  cols: np.ndarray
  grid_h: np.ndarray
  grid_w: np.ndarray
  num_tokens: tuple[int, ...]     # LM image tokens per image, in order: (h/2)*(w/2)

  @property
  def num_real_patches(self) -> int:
    return int((self.segment_ids > 0).sum())

  @property
  def efficiency(self) -> float:
    """Real patches / slots."""
    return self.num_real_patches / max(1, self.segment_ids.shape[0])

  def arrays(self) -> dict[str, np.ndarray]:
    return {k: getattr(self, k) for k in PATCH_FIELDS}


def _unpack_image(image: ImageInput, i: int) -> tuple[np.ndarray, int, int, str]:
  if isinstance(image, ProcessedImage):
    patches, (h, w), name = image.patches, image.grid_hw, image.name
  else:
    try:
      patches, (h, w) = image
    except (TypeError, ValueError) as e:
      raise PackingError(f'image[{i}]: expected a ProcessedImage or (patches, (h, w)), '
                         f'got {type(image).__name__}') from e
    name = f'image[{i}]'
  patches = np.asarray(patches)
  if patches.ndim != 2 or patches.shape[0] != h * w:
    raise PackingError(f'{name}: patches of shape {patches.shape} do not match grid {h}x{w} '
                       f'({h * w} patches expected)')
  return patches, int(h), int(w), name


def pack_images(images: Sequence[ImageInput], max_patches: int,
                merge: tuple[int, int] = (2, 2), patch_dim: int = 588,
                dtype=np.float32) -> PackedImages:
  """Packs one example's images (raster-ordered patches) into ``max_patches`` slots.

  Args:
    images: ProcessedImage or ``(patches [h*w, patch_dim] raster order, (h, w))`` each.
    max_patches: slots per example (P), a multiple of merge area.
    merge: the merge kernel (2, 2).
    patch_dim: C*p*p (588 for 3x14x14); used for the empty buffer when there are no images.
    dtype: dtype of the patch buffer.
  Raises:
    PackingError naming the images and sizes if they do not fit or are malformed.
  """
  area = merge[0] * merge[1]
  if max_patches <= 0 or max_patches % area:
    raise PackingError(f'max_patches={max_patches} must be a positive multiple of {area}')
  unpacked = [_unpack_image(im, i) for i, im in enumerate(images)]
  sizes = [h * w for _, h, w, _ in unpacked]
  if sum(sizes) > max_patches:
    listing = ', '.join(f'{n} {h}x{w}' for _, h, w, n in unpacked)
    raise PackingError(f'{len(unpacked)} images need {sum(sizes)} patches but the buffer has '
                       f'max_patches={max_patches} ({listing})')
  if unpacked:
    patch_dim = unpacked[0][0].shape[1]
  out = {
      'patches': np.zeros((max_patches, patch_dim), dtype),
      'segment_ids': np.zeros((max_patches,), np.int32),
      'rows': np.zeros((max_patches,), np.int32),
      'cols': np.zeros((max_patches,), np.int32),
      'grid_h': np.zeros((max_patches,), np.int32),
      'grid_w': np.zeros((max_patches,), np.int32),
  }
  start = 0
  num_tokens = []
  for seg, (patches, h, w, name) in enumerate(unpacked, start=1):
    if patches.shape[1] != patch_dim:
      raise PackingError(f'{name}: patch dim {patches.shape[1]} != {patch_dim} of the first image')
    try:
      rows, cols = merge_block_coords(h, w, merge)
    except PackingError as e:
      raise PackingError(f'{name}: {e}') from e
    end = start + h * w
    out['patches'][start:end] = patches[rows * w + cols]
    out['segment_ids'][start:end] = seg
    out['rows'][start:end] = rows
    out['cols'][start:end] = cols
    out['grid_h'][start:end] = h
    out['grid_w'][start:end] = w
    num_tokens.append(h * w // area)
    start = end
  return PackedImages(num_tokens=tuple(num_tokens), **out)


def stack_packs(packs: Sequence[PackedImages]) -> dict[str, np.ndarray]:
  """Stacks per-example packs into a batch: {field: [B, P, ...]} (see PATCH_FIELDS)."""
  if not packs:
    raise PackingError('stack_packs needs at least one example')
  slots = {p.segment_ids.shape[0] for p in packs}
  if len(slots) != 1:
    raise PackingError(f'examples have different max_patches {sorted(slots)}; use one buffer size')
  return {k: np.stack([getattr(p, k) for p in packs]) for k in PATCH_FIELDS}


def packing_efficiency(segment_ids: np.ndarray) -> float:
  """Real patches / slots of a [..., P] segment-id array."""
  segment_ids = np.asarray(segment_ids)
  return float((segment_ids > 0).sum()) / max(1, segment_ids.size)


def assign_first_fit(num_patches: Sequence[int], max_patches: int) -> list[list[int]]:
  """First-fit-decreasing assignment of images (by patch count) to as few examples as possible.

  For image-only batches (e.g. ViT pretraining); returns per-example lists of image indices,
  each in ascending index order. Raises PackingError for an image larger than the buffer.
  """
  order = sorted(range(len(num_patches)), key=lambda i: -num_patches[i])
  bins: list[list[int]] = []
  free: list[int] = []
  for i in order:
    n = num_patches[i]
    if n > max_patches:
      raise PackingError(f'image[{i}] has {n} patches, more than max_patches={max_patches}')
    for b, room in enumerate(free):
      if n <= room:
        bins[b].append(i)
        free[b] -= n
        break
    else:
      bins.append([i])
      free.append(max_patches - n)
  return [sorted(b) for b in bins]


def assign_balanced(num_patches: Sequence[int], num_examples: int,
                    multiple: int = 64) -> tuple[list[list[int]], int]:
  """Images split over exactly ``num_examples`` examples of one buffer size, as even as fits.

  For data parallelism over a fixed number of devices (one example each). Returns (per-example
  lists of image indices in ascending order, some possibly empty; max_patches), where
  max_patches is the smallest multiple of ``multiple`` that is at least the balanced share
  ceil(total / num_examples) and into which first-fit-decreasing places every image in
  ``num_examples`` examples or fewer.
  """
  if num_examples < 1:
    raise PackingError(f'num_examples must be >= 1, got {num_examples}')
  if multiple < 4 or multiple % 4:
    raise PackingError(f'multiple must be a positive multiple of 4 (merge blocks), got {multiple}')
  total = sum(num_patches)
  size = max(-(-total // num_examples), max(num_patches, default=0), 1)
  size = -(-size // multiple) * multiple
  while True:   # ends: at size >= total one example holds everything
    bins = assign_first_fit(num_patches, size)
    if len(bins) <= num_examples:
      return bins + [[] for _ in range(num_examples - len(bins))], size
    size += multiple
