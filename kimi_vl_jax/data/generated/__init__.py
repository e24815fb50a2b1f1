"""Generated datasets: the embedded default data (no downloads; PIL drawing only).

``get_dataset(name, split, seed, **kw)`` returns a random-access source (``len(ds)``, a large
nominal size, and ``ds[i]``, a pure function of (seed, split, i)), usable directly as
``grain.MapDataset.source(ds)``. Splits are disjoint by construction for any seeds: the eval
split is the part of the spec space whose hash is 0 mod 16 (``base.py``).

| name | tasks (answer) | chance at difficulty 0 |
| --- | --- | --- |
| shapes | count (1..5), color (6 names), shape (3 kinds), caption (canonical sentence) | 1/5, 1/6, 1/3, 0 |
| ocr | ocr_word (20 words), ocr_number (0..999) | 1/20, 1/1000 |
| charts | chart_value (1..9), chart_max (bar letter) | 1/9, 1/3 |
| gui | gui_click (``click(x=0.42, y=0.61)``, normalised), gui_text (button label) | 1/n buttons |
| video | video_direction (left/right/up/down), video_needle (0..9) | 1/4, 1/10 |
| interleaved | interleaved_doc (document), interleaved_qa (figure number) | 0, 1/K figures |
| needle | needle (4-digit code in a long document; ``length``, ``depth``) | 1/9000 |
| math | arithmetic, word_problem (integer; reasoning in think markers) | 0 |
| text | text (document; ``length`` words) | 0 |

``chance_level(task, difficulty)`` gives the exact figure (its rule is in each module's
``chance``). ``difficulty`` 1 and 2 widen every answer space and make images harder.

Record format (the common record of ``kimi_vl_jax/data/sources/base.py`` plus eval keys):

  chat:     {'source': name, 'kind': 'chat', 'task': str,
             'messages': [{'role': 'system'|'user'|'assistant',
                           'content': [{'type': 'text', 'text': str} |
                                       {'type': 'image', 'image': PIL.Image (RGB) or uint8 [H, W, 3]}]}],
             'answer': str (exact answer for eval; the assistant turn ends with it),
             'meta': dict (the spec: every random choice, e.g. shapes, boxes, timestamps),
             'origin': 'name:split:seed=S:index=I'}
  document: the same with 'kind': 'document', 'items': [items] instead of 'messages',
            and 'answer': '' (text and interleaved_doc: pretraining-style, loss on all text).

Images are RGB; sides are drawn independently in [min_side, max_side] (default 56..224; a
dataset may raise min_side where its content needs room; video and interleaved cap frames
at 112 px), so sizes and aspect ratios vary (native resolution). Video frames are image
items, each preceded by a ``'[0.5s]'`` timestamp text item. ``math`` records also carry
``'prompt'`` (the question alone) for RL rollouts. Score responses with
``is_correct(record, text)`` (``scoring.py``) (exact match, click-in-box, or numeric ``verify``).
"""
from __future__ import annotations

from kimi_vl_jax.data.generated import (arithmetic, charts, gui, interleaved, needle, ocr,
                                        shapes, text, video)
from kimi_vl_jax.data.generated.base import SPLITS, GeneratedDataset
from kimi_vl_jax.data.generated.scoring import exact_match, is_correct, verify

_MODULES = {
    'shapes': (shapes, shapes.ShapesDataset),
    'ocr': (ocr, ocr.OcrDataset),
    'charts': (charts, charts.ChartsDataset),
    'gui': (gui, gui.GuiDataset),
    'video': (video, video.VideoDataset),
    'interleaved': (interleaved, interleaved.InterleavedDataset),
    'needle': (needle, needle.NeedleDataset),
    'math': (arithmetic, arithmetic.ArithmeticDataset),
    'text': (text, text.TextDataset),
}
DATASETS = tuple(_MODULES)
# task -> dataset name (task names are unique across datasets).
TASK_TO_DATASET = {t: name for name, (_, cls) in _MODULES.items() for t in cls.TASKS}


def get_dataset(name: str, split: str = 'train', seed: int = 0, **kw) -> GeneratedDataset:
  """The generated dataset ``name`` (one of DATASETS) for ``split`` ('train' | 'eval').

  Keyword arguments: tasks, difficulty (0, 1, 2), size, min_side, max_side, image_format
  ('pil' | 'numpy'), and per-dataset ones (video: num_frames, frame_max_side; needle:
  length, depth; text: length; math: think; interleaved: fig_max_side).
  """
  if name not in _MODULES:
    raise ValueError(f'unknown generated dataset {name!r}; known: {", ".join(DATASETS)}')
  return _MODULES[name][1](split, seed, **kw)


def chance_level(task: str, difficulty: int = 0) -> float:
  """Exact-match accuracy of a uniform guess over ``task``'s answer space (0 if unbounded)."""
  if task not in TASK_TO_DATASET:
    raise ValueError(f'unknown task {task!r}; known: {", ".join(sorted(TASK_TO_DATASET))}')
  if difficulty not in (0, 1, 2):
    raise ValueError(f'difficulty={difficulty!r}; expected 0, 1 or 2')
  return _MODULES[TASK_TO_DATASET[task]][0].chance(task, difficulty)


__all__ = ['DATASETS', 'SPLITS', 'TASK_TO_DATASET', 'GeneratedDataset', 'chance_level',
           'exact_match', 'get_dataset', 'is_correct', 'verify']
