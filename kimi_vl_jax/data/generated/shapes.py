"""Shapes VQA and captions: count, colour, shape kind, and a canonical caption.

Shapes sit in distinct cells of a grid, so they never overlap, and are drawn without
anti-aliasing in exact palette colours over a light background: the answer can be
re-derived from the pixels (connected components, colour look-up).

Difficulty 0: counts 1..5 of one kind and colour; a single shape for colour/kind
questions; 3 kinds, 6 colours, upright. 1: counts 1..9, mixed kinds/colours, several
shapes with the asked-about one unique, 4 kinds, rotations. 2: counts 1..15, 6 kinds,
10 colours.
"""
from __future__ import annotations

import math

from PIL import Image, ImageDraw

from kimi_vl_jax.data.generated import base, render

MAX_COUNT = (5, 9, 15)
CAPTION_MAX = (3, 5, 8)

_QUESTIONS = {
    'count': ('How many shapes are in the image?', 'Count the shapes.',
              'How many objects can you see?'),
    'color': ('What color is the {kind}?', 'Which color does the {kind} have?'),
    'color1': ('What color is the shape?', 'What is the color of the object?'),
    'shape': ('What shape is the {color} object?', 'Which shape is {color}?'),
    'shape1': ('What shape is this?', 'What is the shape in the image?'),
    'caption': ('Describe the image.', 'Write a caption for the image.'),
}


def _pick(kind: str, q: int) -> str:
  return _QUESTIONS[kind][q % len(_QUESTIONS[kind])]


def caption_text(shapes) -> str:
  """Canonical caption: groups by (colour, kind) in palette then SHAPES order."""
  color_order = list(render.ALL_COLORS)
  counts: dict[tuple[str, str], int] = {}
  for kind, color, *_ in shapes:
    counts[(color, kind)] = counts.get((color, kind), 0) + 1
  keys = sorted(counts, key=lambda ck: (color_order.index(ck[0]), render.SHAPES.index(ck[1])))
  parts = [f'{counts[k]} {k[0]} {k[1] if counts[k] == 1 else render.SHAPE_PLURALS[k[1]]}'
           for k in keys]
  body = parts[0] if len(parts) == 1 else ', '.join(parts[:-1]) + ' and ' + parts[-1]
  return f'The image shows {body}.'


def place_shapes(rng, w: int, h: int, attrs, difficulty: int) -> tuple:
  """(kind, colour, cx, cy, r, angle) per (kind, colour) in ``attrs``, one grid cell each."""
  shapes = []
  for (kind, color), (x0, y0, x1, y1) in zip(attrs, render.grid_cells(rng, w, h, len(attrs))):
    cell = min(x1 - x0, y1 - y0)
    r = max(4, int(cell * rng.uniform(0.3 if difficulty == 0 else 0.2, 0.45)))
    cx = rng.randint(int(math.ceil(x0 + r)), max(int(math.ceil(x0 + r)), int(x1 - r - 1)))
    cy = rng.randint(int(math.ceil(y0 + r)), max(int(math.ceil(y0 + r)), int(y1 - r - 1)))
    angle = 0 if difficulty == 0 else rng.randrange(0, 360, 15)
    shapes.append((kind, color, cx, cy, r, angle))
  return tuple(shapes)


def draw_shapes(w: int, h: int, bg, shapes) -> Image.Image:
  img = Image.new('RGB', (w, h), bg)
  draw = ImageDraw.Draw(img)
  for kind, color, cx, cy, r, angle in shapes:
    render.draw_shape(draw, kind, cx, cy, r, render.ALL_COLORS[color], angle)
  return img


class ShapesDataset(base.GeneratedDataset):
  """Shapes/colours/counting VQA and captions (tasks: count, color, shape, caption)."""
  name = 'shapes'
  TASKS = ('count', 'color', 'shape', 'caption')
  DEFAULT_TASKS = TASKS

  def sample_spec(self, rng, task):
    d = self.difficulty
    kinds, colors = render.shape_names(d), render.color_names(d)
    if task == 'count':
      n = rng.randint(1, MAX_COUNT[d])
    elif task == 'caption':
      n = rng.randint(1, CAPTION_MAX[d])
    else:
      n = 1 if d == 0 else rng.randint(2, min(4, len(kinds)))
    w, h = self.image_size(rng, min_side=28 * math.ceil(math.sqrt(n)))
    if task == 'count' and d == 0:
      kind, color = rng.choice(kinds), rng.choice(colors)
      attrs = [(kind, color)] * n
    elif task == 'color' and n > 1:        # the asked-about kind is unique in the image
      ks = rng.sample(kinds, n)
      attrs = [(k, rng.choice(colors)) for k in ks]
    elif task == 'shape' and n > 1:        # the asked-about colour is unique in the image
      cs = rng.sample(colors, n)
      attrs = [(rng.choice(kinds), c) for c in cs]
    else:
      attrs = [(rng.choice(kinds), rng.choice(colors)) for _ in range(n)]
    shapes = place_shapes(rng, w, h, attrs, d)
    target = rng.randrange(n)
    q = rng.randrange(6)   # question template, taken modulo the template count
    return {'w': w, 'h': h, 'bg': render.light_background(rng, d), 'shapes': tuple(shapes),
            'target': target, 'q': q}

  def draw(self, spec) -> Image.Image:
    return draw_shapes(spec['w'], spec['h'], spec['bg'], spec['shapes'])

  def render(self, spec):
    task, shapes = spec['task'], spec['shapes']
    kind, color = shapes[spec['target']][:2]
    if task == 'count':
      question = _pick('count', spec['q'])
      answer = str(len(shapes))
    elif task == 'color':
      question = (_pick('color1', spec['q']) if len(shapes) == 1
                  else _pick('color', spec['q']).format(kind=kind))
      answer = color
    elif task == 'shape':
      question = (_pick('shape1', spec['q']) if len(shapes) == 1
                  else _pick('shape', spec['q']).format(color=color))
      answer = kind
    else:
      question = _pick('caption', spec['q'])
      answer = caption_text(shapes)
    content = [self.image(self.draw(spec)), base.text_item(question)]
    return self.record(spec, base.qa_messages(content, answer), answer)


def chance(task: str, difficulty: int) -> float:
  """count: uniform over 1..MAX_COUNT; color: 1/#colours; shape: 1/#kinds; caption: ~0."""
  if task == 'count':
    return 1.0 / MAX_COUNT[difficulty]
  if task == 'color':
    return 1.0 / len(render.color_names(difficulty))
  if task == 'shape':
    return 1.0 / len(render.shape_names(difficulty))
  return 0.0
