"""OCR: rendered words and numbers in varied fonts, sizes, colours and rotations.

The text is sized to fit inside the image after rotation (never clipped) and drawn over a
contrasting background. Difficulty 0: one word from 20 or a number 0..999, large, upright
fonts, rotation within +-10 degrees. 1: 100 words or numbers up to 99999, oblique faces,
+-30 degrees, tinted colours. 2: all words, two-word phrases, numbers up to 9999999,
+-60 degrees, light text on dark backgrounds too.

Keyword arguments narrow a tier's layout: ``max_angle`` (degrees; 0 = upright), ``min_fill``
(the smallest text size as a fraction of the largest that fits; near 1 the text fills the
image, so its size barely varies) and ``aspect`` (width / height of a text-line canvas; the
width is drawn in [min_side, max_side]; a short word then fills both directions, so its
position barely varies either). A from-scratch ViT learns to read the full tier-0 layout
slowly: supervised on 9,600 word images (``python -m kimi_vl_jax.bench.vision_probe``) it
stays at chance (0.04 held-out) at 56-112 px, and reaches 0.58 on upright text filling a
112 px canvas and 0.71 on a 112 x 56 text line (``aspect=2``, the demo's OCR view).
"""
from __future__ import annotations

from PIL import Image

from kimi_vl_jax.data.generated import base, render, vocab

MAX_NUMBER = (999, 99_999, 9_999_999)
MAX_ANGLE = (10, 30, 60)
SIZE_FRACTION = ((0.75, 0.95), (0.55, 0.95), (0.4, 0.95))   # of the largest size that fits
MIN_FONT_PX = 12
_QUESTIONS = ('What does the text say?', 'Read the text in the image.',
              'What is written in the image?', 'Transcribe the text.')


def _lum(c) -> float:
  return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _contrasting_colors(rng, difficulty: int):
  """(background, foreground) with a luminance gap of at least 120 (of 255), no redraws."""
  if difficulty == 0:
    return (render.light_background(rng, 0),
            rng.choice(list(render.PALETTE.values()) + [(20, 20, 20)] * 3))
  light = tuple(rng.randint(170, 255) for _ in range(3))     # luminance >= 170
  dark = tuple(rng.randint(0, 50) for _ in range(3))         # luminance <= 50
  # Pull one channel of each toward the middle for more varied hues, keeping the gap.
  k = rng.randrange(3)
  light = light[:k] + (rng.randint(60, 255),) + light[k + 1:]
  if _lum(light) - _lum(dark) < 120:
    light = light[:k] + (255,) + light[k + 1:]
  if difficulty == 2 and rng.random() < 0.5:
    return dark, light
  return light, dark


class OcrDataset(base.GeneratedDataset):
  """OCR of words and numbers (tasks: ocr_word, ocr_number); the answer is the exact text."""
  name = 'ocr'
  TASKS = ('ocr_word', 'ocr_number')
  DEFAULT_TASKS = TASKS

  def __init__(self, *args, max_angle: int | str | None = None,
               min_fill: float | str | None = None, aspect: float | str | None = None, **kw):
    super().__init__(*args, **kw)
    d = self.difficulty
    self.aspect = None if aspect is None else _number('aspect', aspect, float)
    if self.aspect is not None and not 1 <= self.aspect <= 8:
      raise ValueError(f'ocr: aspect={aspect!r}; expected a width / height ratio in [1, 8]')
    self.max_angle = MAX_ANGLE[d] if max_angle is None else _number('max_angle', max_angle, int)
    if not 0 <= self.max_angle <= 90:
      raise ValueError(f'ocr: max_angle={max_angle!r}; expected degrees in [0, 90]')
    lo, hi = SIZE_FRACTION[d]
    if min_fill is not None:
      lo = _number('min_fill', min_fill, float)
      if not 0 < lo <= 1:
        raise ValueError(f'ocr: min_fill={min_fill!r}; expected a fraction in (0, 1]')
      hi = max(hi, lo)
    self.size_fraction = (lo, hi)

  def sample_text(self, rng, task) -> str:
    d = self.difficulty
    if task == 'ocr_number':
      return str(rng.randint(0, MAX_NUMBER[d]))
    words = vocab.WORDS[:vocab.N_WORDS[d]]
    if d == 2 and rng.random() < 0.5:
      return f'{rng.choice(words)} {rng.choice(words)}'
    return rng.choice(words)

  def sample_spec(self, rng, task):
    """Cheap draws only (the split hash is computed on every draw); sizes resolve in layout."""
    d = self.difficulty
    text = self.sample_text(rng, task)
    font = rng.choice(render.font_names(d))
    angle = rng.randint(-self.max_angle, self.max_angle)
    for _ in range(100):      # redraw the canvas until the text fits at a legible size
      if self.aspect is None:
        w, h = self.image_size(rng)
      else:                   # a text-line canvas: width in [min_side, max_side], fixed ratio
        w = rng.randint(self.min_side, self.max_side)
        h = max(8, round(w / self.aspect))
      if _estimate_fit(font, text, w, h, angle) >= MIN_FONT_PX + 2:
        break
    else:
      raise ValueError(f'ocr: {text!r} does not fit at {MIN_FONT_PX}px in images of at most '
                       f'max_side={self.max_side}px; raise max_side')
    bg, fg = _contrasting_colors(rng, d)
    return {'w': w, 'h': h, 'text': text, 'font': font, 'angle': angle,
            'size_frac': round(rng.uniform(*self.size_fraction), 3),
            'pos': (round(rng.random(), 3), round(rng.random(), 3)), 'bg': bg, 'fg': fg,
            'q': rng.randrange(len(_QUESTIONS))}

  def draw(self, spec) -> tuple[Image.Image, dict]:
    """The image and its resolved layout {'size', 'cx', 'cy'} (font px, text centre)."""
    lay = layout(spec)
    img = Image.new('RGB', (spec['w'], spec['h']), spec['bg'])
    render.paste_text(img, spec['text'], spec['font'], lay['size'], spec['angle'],
                      (lay['cx'], lay['cy']), spec['fg'])
    return img, lay

  def render(self, spec):
    img, lay = self.draw(spec)
    content = [self.image(img), base.text_item(_QUESTIONS[spec['q']])]
    record = self.record(spec, base.qa_messages(content, spec['text']), spec['text'])
    record['meta'] = dict(spec, **lay)
    return record


def _number(name: str, value, kind):
  """A keyword given as a number or as text (a source path's query string passes text)."""
  try:
    return kind(value)
  except (TypeError, ValueError):
    raise ValueError(f'ocr: {name}={value!r}; expected a {kind.__name__}') from None


def _margin(w: int, h: int) -> int:
  return max(2, min(w, h) // 16)


def _estimate_fit(font: str, text: str, w: int, h: int, angle: float) -> float:
  """Linear estimate of the largest fitting size from the (cached) extent at 64 px."""
  m = _margin(w, h)
  l, t, r, b = render.text_extent(font, 64, text)
  rw, rh = render.rotated_extent(r - l + 2, b - t + 2, angle)
  return 64 * min((w - 2 * m) / rw, (h - 2 * m) / rh)


def layout(spec) -> dict:
  """Font size and text centre of an OCR spec (pure): the largest size that fits inside the
  margins, times ``size_frac`` (at least MIN_FONT_PX); the centre anywhere in the room left,
  at ``pos``."""
  w, h, font, text, angle = spec['w'], spec['h'], spec['font'], spec['text'], spec['angle']
  m = _margin(w, h)
  fit = render.fit_font_size(font, text, w - 2 * m, h - 2 * m, angle)
  size = min(fit, max(MIN_FONT_PX, int(fit * spec['size_frac'])))   # legible when it can be
  l, t, r, b = render.text_extent(font, size, text)
  tw, th = render.rotated_extent(r - l + 2, b - t + 2, angle)
  # +1 px each side for the rounding of the rotated layer's size and position.
  cx = m + tw / 2 + 1 + spec['pos'][0] * max(0.0, w - 2 * m - tw - 2)
  cy = m + th / 2 + 1 + spec['pos'][1] * max(0.0, h - 2 * m - th - 2)
  return {'size': size, 'cx': round(cx, 1), 'cy': round(cy, 1)}


def chance(task: str, difficulty: int) -> float:
  """Uniform guess over the answer space: the word list, or the numbers 0..MAX_NUMBER."""
  if task == 'ocr_number':
    return 1.0 / (MAX_NUMBER[difficulty] + 1)
  n = vocab.N_WORDS[difficulty]
  return 1.0 / (n + n * n) if difficulty == 2 else 1.0 / n
