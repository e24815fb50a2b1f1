"""OCR: rendered words and numbers in varied fonts, sizes, colours and rotations.

The text is sized to fit inside the image after rotation (never clipped) and drawn over a
contrasting background. Difficulty 0: one word from 20 or a number 0..999, large, upright
fonts, rotation within +-10 degrees. 1: 100 words or numbers up to 99999, oblique faces,
+-30 degrees, tinted colours. 2: all words, two-word phrases, numbers up to 9999999,
+-60 degrees, light text on dark backgrounds too.
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


def _contrasting_colors(rng, difficulty: int):
  """(background, foreground) with a luminance gap of at least 120 (of 255)."""
  def lum(c):
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
  while True:
    if difficulty == 0:
      bg = render.light_background(rng, 0)
      fg = rng.choice(list(render.PALETTE.values()) + [(20, 20, 20)] * 3)
    else:
      bg = tuple(rng.randint(0, 255) for _ in range(3))
      fg = tuple(rng.randint(0, 255) for _ in range(3))
      if difficulty == 1 and lum(bg) < 128:
        bg, fg = fg, bg
    if abs(lum(bg) - lum(fg)) >= 120:
      return bg, fg


class OcrDataset(base.GeneratedDataset):
  """OCR of words and numbers (tasks: ocr_word, ocr_number); the answer is the exact text."""
  name = 'ocr'
  TASKS = ('ocr_word', 'ocr_number')
  DEFAULT_TASKS = TASKS

  def sample_text(self, rng, task) -> str:
    d = self.difficulty
    if task == 'ocr_number':
      return str(rng.randint(0, MAX_NUMBER[d]))
    words = vocab.WORDS[:vocab.N_WORDS[d]]
    if d == 2 and rng.random() < 0.5:
      return f'{rng.choice(words)} {rng.choice(words)}'
    return rng.choice(words)

  def sample_spec(self, rng, task):
    d = self.difficulty
    text = self.sample_text(rng, task)
    font = rng.choice(render.font_names(d))
    angle = rng.randint(-MAX_ANGLE[d], MAX_ANGLE[d])
    for _ in range(100):      # redraw the canvas until the text fits at a legible size
      w, h = self.image_size(rng)
      margin = max(2, min(w, h) // 16)
      fit = render.fit_font_size(font, text, w - 2 * margin, h - 2 * margin, angle)
      lo, hi = SIZE_FRACTION[d]
      size = int(fit * rng.uniform(lo, hi))
      if size >= MIN_FONT_PX:
        break
    else:
      raise ValueError(f'ocr: {text!r} does not fit at {MIN_FONT_PX}px in images of at most '
                       f'max_side={self.max_side}px; raise max_side')
    l, t, r, b = render.text_extent(font, size, text)
    tw, th = render.rotated_extent(r - l + 2, b - t + 2, angle)
    # Centre anywhere that keeps the rotated layer (plus its rounding) inside the margins.
    cx = rng.uniform(margin + tw / 2 + 1, w - margin - tw / 2 - 1)
    cy = rng.uniform(margin + th / 2 + 1, h - margin - th / 2 - 1)
    bg, fg = _contrasting_colors(rng, d)
    return {'w': w, 'h': h, 'text': text, 'font': font, 'size': size, 'angle': angle,
            'cx': round(cx, 1), 'cy': round(cy, 1), 'bg': bg, 'fg': fg,
            'q': rng.randrange(len(_QUESTIONS))}

  def draw(self, spec) -> Image.Image:
    img = Image.new('RGB', (spec['w'], spec['h']), spec['bg'])
    render.paste_text(img, spec['text'], spec['font'], spec['size'], spec['angle'],
                      (spec['cx'], spec['cy']), spec['fg'])
    return img

  def render(self, spec):
    content = [self.image(self.draw(spec)), base.text_item(_QUESTIONS[spec['q']])]
    return self.record(spec, base.qa_messages(content, spec['text']), spec['text'])


def chance(task: str, difficulty: int) -> float:
  """Uniform guess over the answer space: the word list, or the numbers 0..MAX_NUMBER."""
  if task == 'ocr_number':
    return 1.0 / (MAX_NUMBER[difficulty] + 1)
  n = vocab.N_WORDS[difficulty]
  return 1.0 / (n + n * n) if difficulty == 2 else 1.0 / n
