"""GUI screenshots: a window with labelled buttons; grounding (click) and reading targets.

``gui_click``: "Click the 'Save' button." -> ``"click(x=0.42, y=0.61)"``, the button centre
in coordinates normalised to [0, 1] by the image width and height, two decimals. Any point inside the
button's box is a correct click (``scoring.click_correct``); the box is in
``record['meta']['boxes'][target]`` as normalised (x0, y0, x1, y1).
``gui_text``: "What is written on the blue button?" -> the label.

Difficulty 0: 2-3 buttons, 10 labels; 1: 2-5 buttons, 20 labels; 2: 3-8 buttons.
"""
from __future__ import annotations

from PIL import Image, ImageDraw

from kimi_vl_jax.data.generated import base, render, vocab

N_BUTTONS = ((2, 3), (2, 5), (3, 8))
N_LABELS = (10, 20, 20)
_FONT = 'DejaVuSans.ttf'
_Q_CLICK = ("Click the '{label}' button.", "Where should I click to press '{label}'?",
            "Point to the '{label}' button.")
_Q_TEXT = ('What is written on the {color} button?', 'Read the label of the {color} button.')


def font_name() -> str:
  names = render.font_names(0)
  return _FONT if _FONT in names else names[0]


def format_point(x: float, y: float) -> str:
  """The click action text (parsed back by ``scoring.parse_point``)."""
  return f'click(x={x:.2f}, y={y:.2f})'


class GuiDataset(base.GeneratedDataset):
  """Screenshots with buttons (tasks: gui_click, gui_text)."""
  name = 'gui'
  TASKS = ('gui_click', 'gui_text')
  DEFAULT_TASKS = TASKS
  MIN_SIDE_FLOOR = 84

  def sample_spec(self, rng, task):
    d = self.difficulty
    n = rng.randint(*N_BUTTONS[d])
    labels = rng.sample(vocab.BUTTONS[:N_LABELS[d]], n)
    colors = rng.sample(render.color_names(d), n)
    font = font_name()
    for _ in range(100):
      w, h = self.image_size(rng, min_side=84 + 14 * (n > 4), max_aspect=2.5)
      title_h = max(12, h // 8)
      cells = render.grid_cells(rng, w - 8, h - title_h - 8, n)
      size = min(render.fit_font_size(font, lab, 0.8 * (x1 - x0) - 8, 0.6 * (y1 - y0) - 6, 0)
                 for lab, (x0, y0, x1, y1) in zip(labels, cells))
      size = min(size, max(9, h // 7))
      if size >= 9:
        break
    else:
      raise ValueError(f'gui: {n} buttons do not fit at 9px in images of at most '
                       f'max_side={self.max_side}px; raise max_side')
    boxes = []
    for lab, (x0, y0, x1, y1) in zip(labels, cells):
      l, t, r, b = render.text_extent(font, size, lab)
      bw = min(int(x1 - x0) - 2, r - l + 8 + rng.randint(0, 12))
      bh = min(int(y1 - y0) - 2, b - t + 6 + rng.randint(0, 8))
      bx = 4 + int(x0) + rng.randint(1, max(1, int(x1 - x0) - bw - 1))
      by = title_h + 4 + int(y0) + rng.randint(1, max(1, int(y1 - y0) - bh - 1))
      boxes.append((bx, by, bx + bw, by + bh))
    return {'w': w, 'h': h, 'title': rng.choice(vocab.WINDOW_TITLES), 'title_h': title_h,
            'font_size': size, 'labels': tuple(labels), 'colors': tuple(colors),
            'boxes_px': tuple(boxes),
            'boxes': tuple((round(x0 / w, 4), round(y0 / h, 4), round(x1 / w, 4), round(y1 / h, 4))
                           for x0, y0, x1, y1 in boxes),
            'target': rng.randrange(n), 'q': rng.randrange(6),
            'bg': render.light_background(rng, 0)}

  def draw(self, spec) -> Image.Image:
    w, h = spec['w'], spec['h']
    img = Image.new('RGB', (w, h), spec['bg'])
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, w - 1, spec['title_h'] - 1), fill=(50, 55, 70))
    title_font = render.get_font(font_name(), max(8, spec['title_h'] - 4))
    draw.text((4, spec['title_h'] // 2), spec['title'], font=title_font, fill=(235, 235, 235),
              anchor='lm')
    font = render.get_font(font_name(), spec['font_size'])
    for lab, color, (x0, y0, x1, y1) in zip(spec['labels'], spec['colors'], spec['boxes_px']):
      rgb = render.ALL_COLORS[color]
      draw.rounded_rectangle((x0, y0, x1 - 1, y1 - 1), radius=3, fill=rgb,
                             outline=tuple(c // 2 for c in rgb))
      light = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 150
      draw.text(((x0 + x1) / 2, (y0 + y1) / 2), lab, font=font,
                fill=(20, 20, 20) if light else (250, 250, 250), anchor='mm')
    return img

  def render(self, spec):
    t = spec['target']
    w, h = spec['w'], spec['h']
    x0, y0, x1, y1 = spec['boxes_px'][t]
    if spec['task'] == 'gui_click':
      question = _Q_CLICK[spec['q'] % len(_Q_CLICK)].format(label=spec['labels'][t])
      answer = format_point((x0 + x1) / 2 / w, (y0 + y1) / 2 / h)
    else:
      question = _Q_TEXT[spec['q'] % len(_Q_TEXT)].format(color=spec['colors'][t])
      answer = spec['labels'][t]
    content = [self.image(self.draw(spec)), base.text_item(question)]
    return self.record(spec, base.qa_messages(content, answer), answer)


def chance(task: str, difficulty: int) -> float:
  """Both tasks: an informed guess of one of the n visible buttons, 1/n averaged over n."""
  lo, hi = N_BUTTONS[difficulty]
  return sum(1.0 / n for n in range(lo, hi + 1)) / (hi - lo + 1)
