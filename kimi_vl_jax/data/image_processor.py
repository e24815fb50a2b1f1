"""Host-side image preprocessing of the released Kimi-VL processor (SPEC §2.7).

file / PIL image / HWC uint8 array
  -> RGB
  -> token-limit resize: if (W//14)*(H//14) > in_token_limit, scale both sides by
     sqrt(limit / that), truncating to int, PIL bicubic
  -> pad right/bottom with black to multiples of 28 (patch 14 x merge 2), so the patch grid
     (h, w) is even on both sides
  -> reject grids with >= max_patches_per_side patches on a side (the rotary table size)
  -> /255, (x - 0.5) / 0.5
  -> patches [h*w, 3*14*14] in raster order, each flattened in (C, 14, 14) order
     (the order of the patch-embedding conv weight).

Video frames are images with their own grids: ``process_video_frames``.
Non-RGB inputs are converted to RGB first (the release converts after resizing; the result
is identical for RGB inputs, and converting first gives one clear error for bad modes).
Every error names the image (its path, or ``image[i]`` / the caller's name).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


class ImageProcessingError(ValueError):
  """An image could not be preprocessed; the message names the image."""


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
  """Released preprocessor values (SPEC §2.7)."""
  patch_size: int = 14
  merge_kernel_size: tuple[int, int] = (2, 2)
  in_token_limit: int = 4096        # Kimi-VL-Thinking-2506: 16384 (inferred)
  max_patches_per_side: int = 512
  mean: float = 0.5
  std: float = 0.5

  @classmethod
  def from_vision_config(cls, vision_cfg, in_token_limit: int = 4096) -> 'ImageProcessorConfig':
    """From a ``model.vision`` config block (patch size, merge kernel, side limit)."""
    return cls(patch_size=int(vision_cfg.patch_size),
               merge_kernel_size=tuple(int(k) for k in vision_cfg.merge_kernel_size),
               in_token_limit=in_token_limit,
               max_patches_per_side=int(vision_cfg.max_patches_per_side))


@dataclasses.dataclass(frozen=True)
class ProcessedImage:
  """One preprocessed image.

  patches: [h*w, C*p*p] float32, raster order over the (h, w) patch grid.
  grid_hw: (h, w) in patches; both divisible by the merge kernel.
  name: how errors refer to this image.
  """
  patches: np.ndarray
  grid_hw: tuple[int, int]
  name: str

  @property
  def num_patches(self) -> int:
    return self.grid_hw[0] * self.grid_hw[1]


def _name_of(image: Any, name: Optional[str], index: Optional[int]) -> str:
  if name is not None:
    return name
  if isinstance(image, (str, os.PathLike)):
    return os.fspath(image)
  filename = getattr(image, 'filename', '')
  if filename:
    return filename
  return f'image[{index}]' if index is not None else 'image'


def _to_rgb(image: ImageLike, name: str) -> Image.Image:
  if isinstance(image, (str, os.PathLike)):
    try:
      with Image.open(image) as opened:
        opened.load()
        pil = opened.copy()
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
      raise ImageProcessingError(f'{name}: cannot read file ({e.__class__.__name__}: {e})') from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
      raise ImageProcessingError(f'{name}: unreadable or corrupt image file ({e})') from e
  elif isinstance(image, Image.Image):
    pil = image
  elif isinstance(image, np.ndarray):
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
      raise ImageProcessingError(
          f'{name}: expected an HWC array with 1, 3 or 4 channels, got shape {image.shape}')
    if image.dtype != np.uint8:
      raise ImageProcessingError(f'{name}: expected a uint8 array, got dtype {image.dtype}')
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    if 0 in image.shape[:2]:
      raise ImageProcessingError(f'{name}: zero-size image ({image.shape[1]}x{image.shape[0]})')
    pil = Image.fromarray(image[..., :3])
  else:
    raise ImageProcessingError(f'{name}: unsupported image type {type(image).__name__}')
  if pil.width == 0 or pil.height == 0:
    raise ImageProcessingError(f'{name}: zero-size image ({pil.width}x{pil.height})')
  if pil.mode != 'RGB':
    try:
      pil = pil.convert('RGB')
    except (ValueError, OSError) as e:
      raise ImageProcessingError(f'{name}: cannot convert mode {pil.mode!r} to RGB ({e})') from e
  return pil


def target_size(width: int, height: int, config: ImageProcessorConfig) -> tuple[int, int]:
  """(width, height) after the token-limit resize (before padding)."""
  p = config.patch_size
  tokens = (width // p) * (height // p)
  if tokens > config.in_token_limit:
    scale = math.sqrt(config.in_token_limit / tokens)
    return int(width * scale), int(height * scale)
  return width, height


def padded_grid(width: int, height: int, config: ImageProcessorConfig) -> tuple[int, int]:
  """(h, w) patch grid after the resize and the pad to multiples of patch x merge."""
  w, h = target_size(width, height, config)
  mh, mw = config.merge_kernel_size
  p = config.patch_size
  return -(-h // (p * mh)) * mh, -(-w // (p * mw)) * mw


def process_image(image: ImageLike, config: ImageProcessorConfig = ImageProcessorConfig(), *,
                  name: Optional[str] = None, index: Optional[int] = None) -> ProcessedImage:
  """Preprocesses one image (path, PIL image or HWC uint8 array) into patches + grid."""
  name = _name_of(image, name, index)
  pil = _to_rgb(image, name)
  new_w, new_h = target_size(pil.width, pil.height, config)
  if new_w < 1 or new_h < 1:
    raise ImageProcessingError(
        f'{name}: {pil.width}x{pil.height} shrinks to zero size under the token limit '
        f'{config.in_token_limit}')
  if (new_w, new_h) != (pil.width, pil.height):
    pil = pil.resize((new_w, new_h), Image.Resampling.BICUBIC)
  p = config.patch_size
  mh, mw = config.merge_kernel_size
  h, w = -(-new_h // (p * mh)) * mh, -(-new_w // (p * mw)) * mw
  limit = config.max_patches_per_side
  if h >= limit or w >= limit:
    raise ImageProcessingError(
        f'{name}: patch grid {h}x{w} after resizing reaches the limit of {limit} patches per side '
        f'(image {new_w}x{new_h} px); lower in_token_limit or resize the image')
  pixels = np.zeros((h * p, w * p, 3), np.uint8)   # black padding right/bottom
  pixels[:new_h, :new_w] = np.asarray(pil, dtype=np.uint8)
  x = (pixels.astype(np.float32) / 255.0 - config.mean) / config.std
  # [h*p, w*p, C] -> [h, p, w, p, C] -> [h, w, C, p, p] -> [h*w, C*p*p] (raster, C-major patches).
  patches = x.reshape(h, p, w, p, 3).transpose(0, 2, 4, 1, 3).reshape(h * w, 3 * p * p)
  return ProcessedImage(patches=np.ascontiguousarray(patches), grid_hw=(h, w), name=name)


def process_images(images: Sequence[ImageLike],
                   config: ImageProcessorConfig = ImageProcessorConfig(),
                   names: Optional[Sequence[str]] = None) -> list[ProcessedImage]:
  """Preprocesses a list of images; errors name ``image[i]`` (or the path / given name)."""
  if names is not None and len(names) != len(images):
    raise ValueError(f'names has {len(names)} entries for {len(images)} images')
  return [process_image(im, config, name=None if names is None else names[i], index=i)
          for i, im in enumerate(images)]


def process_video_frames(frames: Sequence[ImageLike],
                         config: ImageProcessorConfig = ImageProcessorConfig(),
                         video_name: str = 'video') -> list[ProcessedImage]:
  """Frames of a video: each frame is an image with its own grid, named ``video[frame i]``."""
  return [process_image(f, config, name=f'{video_name}[frame {i}]') for i, f in enumerate(frames)]
