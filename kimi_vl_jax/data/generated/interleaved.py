"""Interleaved image-text documents, and questions across several images.

``interleaved_doc`` (a document record): a short illustrated report, text and figures in
order; each figure is followed by its caption, which states exactly what the figure
shows (the canonical shapes caption), so the text is predictable from the images.
``interleaved_qa`` (a chat record): figures 1..K in one user turn; "In which figure is there
a blue triangle?" -> the figure number (that colour-kind pair is in exactly one figure).

Difficulty sets the figure count (2-3, 2-4, 3-6) and the shapes per figure (1-2, 1-3, 1-4).
"""
from __future__ import annotations

from kimi_vl_jax.data.generated import base, render, shapes, vocab

N_FIGURES = ((2, 3), (2, 4), (3, 6))
N_SHAPES = ((1, 2), (1, 3), (1, 4))
_Q = ('In which figure is there a {color} {kind}? Answer with the figure number.',
      'Which figure shows a {color} {kind}? Answer with the figure number.')


class InterleavedDataset(base.GeneratedDataset):
  """Interleaved documents and multi-image questions (tasks: interleaved_doc, interleaved_qa).

  Extra arg: fig_max_side (default 112) caps figure sides, as documents hold several.
  """
  name = 'interleaved'
  TASKS = ('interleaved_doc', 'interleaved_qa')
  DEFAULT_TASKS = TASKS

  def __init__(self, *args, fig_max_side: int = 112, **kw):
    super().__init__(*args, **kw)
    if fig_max_side < self.min_side:
      raise ValueError(f'interleaved: fig_max_side={fig_max_side} < min_side={self.min_side}')
    self.max_side = min(self.max_side, fig_max_side)

  def _figure(self, rng):
    d = self.difficulty
    n = rng.randint(*N_SHAPES[d])
    w, h = self.image_size(rng, min_side=28 * (1 + (n > 1)))
    kinds, colors = render.shape_names(d), render.color_names(d)
    attrs = [(rng.choice(kinds), rng.choice(colors)) for _ in range(n)]
    return (w, h, render.light_background(rng, d), shapes.place_shapes(rng, w, h, attrs, d))

  def sample_spec(self, rng, task):
    k = rng.randint(*N_FIGURES[self.difficulty])
    while True:
      figures = tuple(self._figure(rng) for _ in range(k))
      if task == 'interleaved_doc':
        return {'figures': figures, 'place': rng.choice(vocab.CITIES),
                'intro': rng.randrange(len(vocab.SUBJECTS))}
      target = rng.randrange(k)
      kind, color = rng.choice(figures[target][3])[:2]
      holders = [i for i, f in enumerate(figures) if any(s[:2] == (kind, color) for s in f[3])]
      if holders == [target]:
        return {'figures': figures, 'target': target, 'kind': kind, 'color': color,
                'q': rng.randrange(len(_Q))}

  def render(self, spec):
    images = [self.image(shapes.draw_shapes(*fig)) for fig in spec['figures']]
    if spec['task'] == 'interleaved_doc':
      items = [base.text_item(f"Field notes from {spec['place']}. "
                              f"{vocab.SUBJECTS[spec['intro']]} was the first stop; "
                              f"we drew {len(images)} figures of the shapes we found.\n")]
      for i, (img, fig) in enumerate(zip(images, spec['figures'])):
        caption = shapes.caption_text(fig[3]).replace('The image shows', 'It shows')
        items += [base.text_item(f'Figure {i + 1}:'), img, base.text_item(f' {caption}\n')]
      n_total = sum(len(fig[3]) for fig in spec['figures'])
      items.append(base.text_item(f'In total the figures show {n_total} shapes.'))
      return self.document(spec, items)
    content = []
    for i, img in enumerate(images):
      content += [base.text_item(f'Figure {i + 1}:'), img]
    content.append(base.text_item(_Q[spec['q']].format(color=spec['color'], kind=spec['kind'])))
    answer = str(spec['target'] + 1)
    return self.record(spec, base.qa_messages(content, answer), answer)


def chance(task: str, difficulty: int) -> float:
  """interleaved_qa: 1/K averaged over the figure count K; interleaved_doc: no answer (0)."""
  if task == 'interleaved_doc':
    return 0.0
  lo, hi = N_FIGURES[difficulty]
  return sum(1.0 / k for k in range(lo, hi + 1)) / (hi - lo + 1)
