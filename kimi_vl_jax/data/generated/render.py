"""Drawing helpers shared by the generated datasets: palette, fonts, shapes, rotated text.

Drawing uses no anti-aliasing for shapes (exact palette colours, so tests can re-derive
counts and colours from pixels); text is anti-aliased (it is rasterised by FreeType).
"""
from __future__ import annotations

import functools
import glob
import importlib.util
import math
import os

from PIL import Image, ImageDraw, ImageFont

# Six well-separated colours: the answer space of the colour questions at difficulty 0/1.
PALETTE = {
    'red': (220, 30, 30),
    'green': (30, 160, 50),
    'blue': (30, 70, 220),
    'yellow': (235, 200, 20),
    'purple': (140, 40, 180),
    'orange': (245, 125, 20),
}
# Difficulty 2 adds four more.
PALETTE_EXTRA = {
    'pink': (245, 120, 190),
    'cyan': (20, 200, 210),
    'brown': (130, 80, 30),
    'black': (20, 20, 20),
}
ALL_COLORS = {**PALETTE, **PALETTE_EXTRA}


def color_names(difficulty: int) -> tuple[str, ...]:
  return tuple(ALL_COLORS) if difficulty >= 2 else tuple(PALETTE)


SHAPES = ('circle', 'square', 'triangle', 'diamond', 'star', 'hexagon')
SHAPE_PLURALS = {'circle': 'circles', 'square': 'squares', 'triangle': 'triangles',
                 'diamond': 'diamonds', 'star': 'stars', 'hexagon': 'hexagons'}


def shape_names(difficulty: int) -> tuple[str, ...]:
  return SHAPES[:(3, 4, 6)[difficulty]]


def light_background(rng, difficulty: int) -> tuple[int, int, int]:
  """A light neutral (difficulty 0) or lightly tinted background, far from every palette colour."""
  if difficulty == 0:
    g = rng.randint(235, 255)
    return (g, g, g)
  return tuple(rng.randint(215, 255) for _ in range(3))


# ---- fonts
PIL_DEFAULT_FONT = 'pil-default'
_DEJAVU_LEGIBLE = ('DejaVuSans.ttf', 'DejaVuSans-Bold.ttf', 'DejaVuSerif.ttf',
                   'DejaVuSansMono.ttf', 'DejaVuSerif-Bold.ttf', 'DejaVuSansMono-Bold.ttf')
_DEJAVU_SLANTED = ('DejaVuSans-Oblique.ttf', 'DejaVuSans-BoldOblique.ttf', 'DejaVuSerif-Italic.ttf',
                   'DejaVuSerif-BoldItalic.ttf', 'DejaVuSansMono-Oblique.ttf',
                   'DejaVuSansMono-BoldOblique.ttf')


@functools.lru_cache(maxsize=None)
def _font_dir() -> str | None:
  """matplotlib's bundled TTF folder, found without importing matplotlib (slow import)."""
  spec = importlib.util.find_spec('matplotlib')
  if spec is None or not spec.submodule_search_locations:
    return None
  for root in spec.submodule_search_locations:
    d = os.path.join(root, 'mpl-data', 'fonts', 'ttf')
    if os.path.isdir(d):
      return d
  return None


@functools.lru_cache(maxsize=None)
def font_names(difficulty: int) -> tuple[str, ...]:
  """Fonts available for this difficulty: PIL's bundled default plus matplotlib's DejaVu.

  Difficulty 0 uses upright fonts; 1 and 2 add oblique/italic faces. Without matplotlib
  only PIL's default font is used (the stream then differs from a machine that has it).
  """
  d = _font_dir()
  present = set(os.path.basename(p) for p in glob.glob(os.path.join(d, '*.ttf'))) if d else set()
  wanted = _DEJAVU_LEGIBLE + (_DEJAVU_SLANTED if difficulty >= 1 else ())
  return (PIL_DEFAULT_FONT,) + tuple(f for f in wanted if f in present)


@functools.lru_cache(maxsize=1024)
def get_font(name: str, size: int) -> ImageFont.FreeTypeFont:
  if name == PIL_DEFAULT_FONT:
    return ImageFont.load_default(size=size)
  d = _font_dir()
  if d is None:
    raise FileNotFoundError(f'font {name!r}: matplotlib font folder not found')
  return ImageFont.truetype(os.path.join(d, name), size)


@functools.lru_cache(maxsize=65536)
def text_extent(font_name: str, size: int, text: str) -> tuple[int, int, int, int]:
  """Ink bbox (left, top, right, bottom) of ``text`` drawn at the origin."""
  return get_font(font_name, size).getbbox(text)


def rotated_extent(w: float, h: float, angle_deg: float) -> tuple[float, float]:
  a = math.radians(angle_deg)
  c, s = abs(math.cos(a)), abs(math.sin(a))
  return w * c + h * s, w * s + h * c


def fit_font_size(font_name: str, text: str, box_w: float, box_h: float, angle: float,
                  ref: int = 64) -> int:
  """Largest size whose rotated text fits in (box_w, box_h), from a linear fit at ``ref``.

  Rendering verifies the fit; text extents are close to linear in the size.
  """
  l, t, r, b = text_extent(font_name, ref, text)
  rw, rh = rotated_extent(r - l + 2, b - t + 2, angle)
  size = int(ref * min(box_w / rw, box_h / rh))
  while size > 4:
    l, t, r, b = text_extent(font_name, size, text)
    rw, rh = rotated_extent(r - l + 2, b - t + 2, angle)
    if rw <= box_w and rh <= box_h:
      break
    size -= 1
  return size


def text_layer(text: str, font_name: str, size: int, angle: float) -> Image.Image:
  """An 'L' mask with the text's ink, rotated counter-clockwise by ``angle`` degrees."""
  l, t, r, b = text_extent(font_name, size, text)
  layer = Image.new('L', (r - l + 2, b - t + 2), 0)
  ImageDraw.Draw(layer).text((1 - l, 1 - t), text, font=get_font(font_name, size), fill=255)
  if angle:
    layer = layer.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
  return layer


def paste_text(img: Image.Image, text: str, font_name: str, size: int, angle: float,
               center: tuple[float, float], fill: tuple[int, int, int]) -> tuple[int, int, int, int]:
  """Draws text centred at ``center``; returns the layer box (x0, y0, x1, y1) in pixels."""
  layer = text_layer(text, font_name, size, angle)
  x0 = int(round(center[0] - layer.width / 2))
  y0 = int(round(center[1] - layer.height / 2))
  img.paste(Image.new('RGB', layer.size, fill), (x0, y0), layer)
  return x0, y0, x0 + layer.width, y0 + layer.height


# ---- shapes
def shape_polygon(kind: str, cx: float, cy: float, r: float, angle: float = 0.0):
  """Vertices of a regular shape of circumradius ``r`` (circle handled by draw_shape)."""
  if kind == 'square':
    n, phase, radii = 4, 45.0, (r,)
  elif kind == 'diamond':    # a rhombus, not a square: stays distinct under rotation
    n, phase, radii = 4, 0.0, (r, 0.6 * r)
  elif kind == 'triangle':
    n, phase, radii = 3, -90.0, (r,)
  elif kind == 'hexagon':
    n, phase, radii = 6, 0.0, (r,)
  elif kind == 'star':
    n, phase, radii = 10, -90.0, (r, 0.45 * r)
  else:
    raise ValueError(f'unknown shape kind {kind!r}; known {SHAPES}')
  pts = []
  for i in range(n):
    a = math.radians(phase + angle + 360.0 * i / n)
    rr = radii[i % len(radii)]
    pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
  return pts


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float,
               fill: tuple[int, int, int], angle: float = 0.0) -> None:
  if kind == 'circle':
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
  else:
    draw.polygon(shape_polygon(kind, cx, cy, r, angle), fill=fill)


def grid_cells(rng, w: int, h: int, n: int) -> list[tuple[float, float, float, float]]:
  """``n`` distinct cells (x0, y0, x1, y1) of a grid over (w, h), so shapes never overlap."""
  cols = max(1, round(math.sqrt(n * w / h)))
  rows = max(1, math.ceil(n / cols))
  while rows * cols < n:
    cols += 1
  cw, ch = w / cols, h / rows
  picked = rng.sample(range(rows * cols), n)
  return [((k % cols) * cw, (k // cols) * ch, (k % cols + 1) * cw, (k // cols + 1) * ch)
          for k in picked]
