"""Short videos as frame sequences: which way did the object move; which number appeared.

A video is an ordered list of equal-size frames, each preceded in the user turn by a text
item with its timestamp (``'[0.5s]'``, at ``FPS`` frames per second); ``meta['timestamps']``
holds the same numbers. Frames are drawn without anti-aliasing.

``video_direction``: one shape moves in a straight line; the answer is the direction
(4 at difficulty 0, 8 with diagonals at 1-2; 1-2 static distractor shapes at 2).
``video_needle``: each frame shows a shape except one that shows a number (0..9 at
difficulty 0, 10..99 at 1-2): needle-in-a-haystack over frames; ``num_frames`` sets the length.
"""
from __future__ import annotations


from PIL import Image, ImageDraw

from kimi_vl_jax.data.generated import base, render

FPS = 2.0
DIRECTION_FRAMES = (4, 6, 8)
NEEDLE_FRAMES = (6, 12, 24)
DIRECTIONS = {'right': (1, 0), 'left': (-1, 0), 'up': (0, -1), 'down': (0, 1),
              'up-right': (1, -1), 'up-left': (-1, -1), 'down-right': (1, 1), 'down-left': (-1, 1)}
_Q_DIR = ('Which way did the object move?', 'In which direction does the shape move?')
_Q_NEEDLE = ('Which number appeared in the video?', 'What number was shown in one of the frames?')
_FONT = 'DejaVuSans-Bold.ttf'


def directions(difficulty: int) -> tuple[str, ...]:
  return tuple(DIRECTIONS)[:4 if difficulty == 0 else 8]


class VideoDataset(base.GeneratedDataset):
  """Frame sequences (tasks: video_direction, video_needle).

  Extra args: num_frames (overrides the per-difficulty frame count), frame_max_side
  (default 112: frames are many, so they are smaller than single images).
  """
  name = 'video'
  TASKS = ('video_direction', 'video_needle')
  DEFAULT_TASKS = ('video_direction',)
  MIN_SIDE_FLOOR = 56

  def __init__(self, *args, num_frames: int | None = None, frame_max_side: int = 112, **kw):
    super().__init__(*args, **kw)
    if num_frames is not None and not (isinstance(num_frames, int) and num_frames >= 2):
      raise ValueError(f'video: num_frames={num_frames!r}; expected an int >= 2')
    if frame_max_side < self.min_side:
      raise ValueError(f'video: frame_max_side={frame_max_side} < min_side={self.min_side}')
    self.num_frames = num_frames
    self.max_side = min(self.max_side, frame_max_side)

  def sample_spec(self, rng, task):
    d = self.difficulty
    w, h = self.image_size(rng, max_aspect=2.0)
    bg = render.light_background(rng, d)
    kinds, colors = render.shape_names(d), render.color_names(min(d, 1))
    if task == 'video_direction':
      t_count = self.num_frames or DIRECTION_FRAMES[d]
      direction = rng.choice(directions(d))
      ux, uy = DIRECTIONS[direction]
      r = int(min(w, h) * rng.uniform(0.1, 0.16))
      # Travel 35-60% of the room along each moving axis, starting where it fits.
      def track(u, side):
        room = side - 2 * r - 2
        if u == 0:
          c = rng.randint(r + 1, side - r - 1)
          return c, 0.0
        travel = room * rng.uniform(0.35, 0.6)
        start = rng.uniform(0, room - travel)
        c0 = r + 1 + (start if u > 0 else room - start)
        return c0, u * travel / (t_count - 1)
      x0, vx = track(ux, w)
      y0, vy = track(uy, h)
      distractors = ()
      if d == 2:
        distractors = tuple((rng.choice(kinds), rng.choice(colors), rng.randint(r, w - r),
                             rng.randint(r, h - r), max(3, r // 2)) for _ in range(rng.randint(1, 2)))
      return {'w': w, 'h': h, 'bg': bg, 'frames': t_count, 'direction': direction,
              'kind': rng.choice(kinds), 'color': rng.choice(colors), 'r': r,
              'x0': round(x0, 1), 'y0': round(y0, 1), 'vx': round(vx, 2), 'vy': round(vy, 2),
              'distractors': distractors, 'q': rng.randrange(2)}
    t_count = self.num_frames or NEEDLE_FRAMES[d]
    number = rng.randint(0, 9) if d == 0 else rng.randint(10, 99)
    fillers = tuple((rng.choice(kinds), rng.choice(colors)) for _ in range(t_count))
    return {'w': w, 'h': h, 'bg': bg, 'frames': t_count, 'number': number,
            'needle_frame': rng.randrange(t_count), 'fillers': fillers, 'q': rng.randrange(2)}

  def draw_frames(self, spec) -> list[Image.Image]:
    w, h = spec['w'], spec['h']
    frames = []
    for t in range(spec['frames']):
      img = Image.new('RGB', (w, h), spec['bg'])
      draw = ImageDraw.Draw(img)
      if spec['task'] == 'video_direction':
        for kind, color, cx, cy, r in spec['distractors']:
          render.draw_shape(draw, kind, cx, cy, r, render.ALL_COLORS[color])
        cx, cy = spec['x0'] + t * spec['vx'], spec['y0'] + t * spec['vy']
        render.draw_shape(draw, spec['kind'], cx, cy, spec['r'], render.ALL_COLORS[spec['color']])
      elif t == spec['needle_frame']:
        font = _FONT if _FONT in render.font_names(0) else render.font_names(0)[0]
        text = str(spec['number'])
        size = render.fit_font_size(font, text, 0.8 * w, 0.8 * h, 0)
        render.paste_text(img, text, font, size, 0, (w / 2, h / 2), (20, 20, 20))
      else:
        kind, color = spec['fillers'][t]
        render.draw_shape(draw, kind, w / 2, h / 2, 0.3 * min(w, h), render.ALL_COLORS[color])
      frames.append(img)
    return frames

  def render(self, spec):
    content = []
    for t, frame in enumerate(self.draw_frames(spec)):
      content += [base.text_item(f'[{t / FPS:.1f}s]'), self.image(frame)]
    if spec['task'] == 'video_direction':
      question, answer = _Q_DIR[spec['q']], spec['direction']
    else:
      question, answer = _Q_NEEDLE[spec['q']], str(spec['number'])
    content.append(base.text_item(question))
    record = self.record(spec, base.qa_messages(content, answer), answer)
    record['meta'] = dict(spec, timestamps=tuple(t / FPS for t in range(spec['frames'])))
    return record


def chance(task: str, difficulty: int) -> float:
  """video_direction: 1/#directions; video_needle: 1/#numbers."""
  if task == 'video_direction':
    return 1.0 / len(directions(difficulty))
  return 0.1 if difficulty == 0 else 1.0 / 90
