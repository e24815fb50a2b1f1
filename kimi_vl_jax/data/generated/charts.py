"""Bar charts with values to read: the value of a named bar, or which bar is tallest.

Bars share a fixed scale (0..VMAX) so a height always means the same value. Difficulty 0:
3 bars with values 1..9 printed on top; 1: 3-5 bars, values 1..20 printed, one colour per
bar; 2: 3-6 bars, values 5..50 in steps of 5, no printed values (read them off the
labelled y axis with gridlines every 10).
"""
from __future__ import annotations

from PIL import Image, ImageDraw

from kimi_vl_jax.data.generated import base, render

N_BARS = ((3, 3), (3, 5), (3, 6))
VALUES = (tuple(range(1, 10)), tuple(range(1, 21)), tuple(range(5, 51, 5)))
VMAX = (9, 20, 50)
LABELS = 'ABCDEF'
_FONT = 'DejaVuSans-Bold.ttf'
_Q_VALUE = ('What is the value of bar {label}?', 'What value does bar {label} show?')
_Q_MAX = ('Which bar is the tallest?', 'Which bar has the largest value?')


def font_name() -> str:
  names = render.font_names(0)
  return _FONT if _FONT in names else names[0]


def layout(spec) -> dict:
  """Pixel geometry of a chart: plot box, per-bar x range, font size (pure in the spec)."""
  w, h, k, d = spec['w'], spec['h'], len(spec['values']), spec['difficulty']
  font_size = max(9, min(h // 9, int(0.5 * w / (k + 1))))
  left = int(2.2 * font_size) if d == 2 else 4
  top = font_size + 6 if d < 2 else font_size // 2 + 4
  bottom = h - font_size - 6
  slot = (w - left - 4) / k
  bars = []
  for i in range(k):
    x0 = int(left + slot * (i + 0.2))
    x1 = int(left + slot * (i + 0.8))
    bars.append((x0, max(x0 + 2, x1)))
  return {'left': left, 'top': top, 'bottom': bottom, 'right': w - 4, 'bars': tuple(bars),
          'font_size': font_size}


def bar_top(geom, value: int, vmax: int) -> int:
  return geom['bottom'] - int(round((geom['bottom'] - geom['top']) * value / vmax))


class ChartsDataset(base.GeneratedDataset):
  """Bar charts (tasks: chart_value -> the number, chart_max -> the bar's letter)."""
  name = 'charts'
  TASKS = ('chart_value', 'chart_max')
  DEFAULT_TASKS = TASKS
  MIN_SIDE_FLOOR = 84

  def sample_spec(self, rng, task):
    d = self.difficulty
    k = rng.randint(*N_BARS[d])
    w, h = self.image_size(rng, min_side=max(84, 24 * k if d < 2 else 28 * k), max_aspect=2.5)
    while True:   # a unique tallest bar keeps chart_max exact
      values = tuple(rng.choice(VALUES[d]) for _ in range(k))
      if values.count(max(values)) == 1:
        break
    names = render.color_names(min(d, 1))
    if d == 0:
      colors = (rng.choice(names),) * k
    else:
      colors = tuple(rng.choice(names) for _ in range(k))
    return {'w': w, 'h': h, 'bg': render.light_background(rng, 0), 'values': values,
            'colors': colors, 'target': rng.randrange(k), 'q': rng.randrange(2)}

  def draw(self, spec) -> Image.Image:
    d, vmax = spec['difficulty'], VMAX[spec['difficulty']]
    geom = layout(spec)
    img = Image.new('RGB', (spec['w'], spec['h']), spec['bg'])
    draw = ImageDraw.Draw(img)
    font = render.get_font(font_name(), geom['font_size'])
    small = render.get_font(font_name(), max(8, geom['font_size'] * 3 // 4))
    ink = (60, 60, 60)
    if d == 2:      # y axis with ticks and gridlines every 10
      for v in range(0, vmax + 1, 10):
        y = bar_top(geom, v, vmax)
        draw.line((geom['left'], y, geom['right'], y), fill=(200, 200, 200))
        draw.text((geom['left'] - 3, y), str(v), font=small, fill=ink, anchor='rm')
      draw.line((geom['left'], geom['top'], geom['left'], geom['bottom']), fill=ink)
    for i, ((x0, x1), value, color) in enumerate(zip(geom['bars'], spec['values'],
                                                       spec['colors'])):
      y = bar_top(geom, value, vmax)
      draw.rectangle((x0, y, x1 - 1, geom['bottom'] - 1), fill=render.ALL_COLORS[color])
      xc = (x0 + x1) / 2
      draw.text((xc, geom['bottom'] + 3), LABELS[i], font=font, fill=ink, anchor='mt')
      if d < 2:
        draw.text((xc, y - 2), str(value), font=font, fill=ink, anchor='mb')
    draw.line((geom['left'], geom['bottom'], geom['right'], geom['bottom']), fill=ink)
    return img

  def render(self, spec):
    label = LABELS[spec['target']]
    if spec['task'] == 'chart_value':
      question = _Q_VALUE[spec['q']].format(label=label)
      answer = str(spec['values'][spec['target']])
    else:
      question = _Q_MAX[spec['q']]
      answer = LABELS[spec['values'].index(max(spec['values']))]
    content = [self.image(self.draw(spec)), base.text_item(question)]
    return self.record(spec, base.qa_messages(content, answer), answer)


def chance(task: str, difficulty: int) -> float:
  """chart_value: 1/#values; chart_max: mean over the bar count of 1/k."""
  if task == 'chart_value':
    return 1.0 / len(VALUES[difficulty])
  lo, hi = N_BARS[difficulty]
  return sum(1.0 / k for k in range(lo, hi + 1)) / (hi - lo + 1)
