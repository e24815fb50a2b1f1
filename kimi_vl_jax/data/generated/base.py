"""The generated-dataset base class: deterministic specs, hash-partitioned splits, records.

Every example is made in two pure steps:

1. ``spec = sample_spec(rng, task)``: a small dict of ints, strings and tuples (image size,
   colours, positions, the text to render, a seed for long filler text) drawn from a
   ``random.Random`` seeded by ``(dataset, seed, split, index, attempt)``.
2. ``record = render(spec)``: draws the image(s) and writes the messages. No randomness
   beyond the spec, so the answer is exactly what the spec says.

Split disjointness is by construction and independent of the seed: a spec belongs to the
eval split iff a 64-bit hash of its canonical text (question wording left out) is 0 mod
``EVAL_MODULUS``; a draw that
lands in the other split's part is redrawn with ``attempt + 1``. So no train example can
equal an eval example for any pair of seeds (equal specs have equal hashes).
"""
from __future__ import annotations

import abc
import hashlib
import random
from typing import Sequence

import numpy as np
from PIL import Image

SPLITS = ('train', 'eval')
EVAL_MODULUS = 16          # 1/16 of the spec space is held out for eval
MAX_ATTEMPTS = 10_000      # eval needs ~16 draws on average; this bound is never hit in practice
DEFAULT_SIZE = 1 << 30     # nominal length: index i and i + DEFAULT_SIZE would otherwise differ


# Spec fields that only vary the wording (question templates): left out of the split hash,
# so a held-out problem is never seen in training under another phrasing.
SPLIT_IGNORED = ('q',)


def spec_hash(name: str, spec: dict) -> int:
  """Stable 64-bit hash of a spec without SPLIT_IGNORED fields (same on every machine)."""
  items = sorted((k, v) for k, v in spec.items() if k not in SPLIT_IGNORED)
  key = f'{name}|{items!r}'.encode()
  return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), 'little')


def split_of(name: str, spec: dict) -> str:
  return 'eval' if spec_hash(name, spec) % EVAL_MODULUS == 0 else 'train'


def make_rng(name: str, seed: int, split: str, index: int, attempt: int) -> random.Random:
  digest = hashlib.blake2b(f'{name}|{seed}|{split}|{index}|{attempt}'.encode(),
                           digest_size=8).digest()
  return random.Random(int.from_bytes(digest, 'little'))


def as_bool(name: str, value) -> bool:
  """A flag given as a bool, 0/1 or 'true'/'false' (mixture specs pass strings)."""
  if isinstance(value, str):
    if value.lower() in ('true', '1', 'yes'):
      return True
    if value.lower() in ('false', '0', 'no'):
      return False
    raise ValueError(f'{name}={value!r}; expected true or false')
  return bool(value)


def text_item(text: str) -> dict:
  return {'type': 'text', 'text': text}


def image_item(image: Image.Image, image_format: str) -> dict:
  if image_format == 'numpy':
    return {'type': 'image', 'image': np.asarray(image, dtype=np.uint8)}
  return {'type': 'image', 'image': image}


def qa_messages(user_content: list[dict], answer_text: str, system: str | None = None) -> list:
  """One user turn (mixed text/image items) and one assistant text turn."""
  messages = []
  if system is not None:
    messages.append({'role': 'system', 'content': [text_item(system)]})
  messages.append({'role': 'user', 'content': user_content})
  messages.append({'role': 'assistant', 'content': [text_item(answer_text)]})
  return messages


class GeneratedDataset(abc.ABC):
  """A grain-compatible random-access source: ``len(ds)`` and ``ds[i]`` (pure in seed, split, i).

  Subclasses set ``name``, ``TASKS`` (all tasks they can make) and ``DEFAULT_TASKS``, and
  implement ``sample_spec(rng, task) -> dict`` and ``render(spec) -> record``.

  Args (shared by every dataset; subclasses add their own keyword arguments):
    split: 'train' or 'eval' (held out, disjoint by spec hash).
    seed: stream seed; different seeds give different streams of the same split.
    tasks: subset of ``TASKS`` to sample from (uniformly); default ``DEFAULT_TASKS``.
    difficulty: 0 (default: small answer spaces, big simple images), 1, or 2.
    size: nominal ``len``; indices must lie in [0, size).
    min_side, max_side: image side range in pixels (each side drawn independently,
      so aspect ratios vary; a dataset may raise min_side where content needs room).
    image_format: 'pil' (RGB ``PIL.Image``) or 'numpy' (uint8 [H, W, 3]).
  """
  name = 'base'
  TASKS: tuple[str, ...] = ()
  DEFAULT_TASKS: tuple[str, ...] = ()
  MIN_SIDE_FLOOR = 1       # content needs at least this many pixels per side

  def __init__(self, split: str = 'train', seed: int = 0, *, tasks: Sequence[str] | None = None,
               difficulty: int = 0, size: int = DEFAULT_SIZE, min_side: int = 56,
               max_side: int = 224, image_format: str = 'pil'):
    if split not in SPLITS:
      raise ValueError(f'{self.name}: split={split!r}; expected one of {SPLITS}')
    if isinstance(tasks, str):      # 'count,color' (as written in a mixture spec)
      tasks = [t.strip() for t in tasks.split(',') if t.strip()]
    tasks = tuple(self.DEFAULT_TASKS if tasks is None else tasks)
    bad = [t for t in tasks if t not in self.TASKS]
    if bad or not tasks:
      raise ValueError(f'{self.name}: tasks={tasks!r}: unknown {bad}; known {self.TASKS}')
    if difficulty not in (0, 1, 2):
      raise ValueError(f'{self.name}: difficulty={difficulty!r}; expected 0, 1 or 2')
    if not (isinstance(size, (int, np.integer)) and size > 0):
      raise ValueError(f'{self.name}: size={size!r}; expected a positive int')
    if not 8 <= min_side <= max_side:
      raise ValueError(f'{self.name}: min_side={min_side}, max_side={max_side}; '
                       'expected 8 <= min_side <= max_side')
    if image_format not in ('pil', 'numpy'):
      raise ValueError(f'{self.name}: image_format={image_format!r}; expected pil or numpy')
    self.split, self.seed, self.tasks = split, int(seed), tasks
    self.difficulty, self.size, self.image_format = difficulty, int(size), image_format
    self.min_side = max(min_side, min(self.MIN_SIDE_FLOOR, max_side))
    self.max_side = max_side

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index) -> dict:
    record = self.render(self.spec(index))
    record['origin'] = f'{self.name}:{self.split}:seed={self.seed}:index={int(index)}'
    return record

  def __repr__(self) -> str:
    return (f'{type(self).__name__}(split={self.split!r}, seed={self.seed}, tasks={self.tasks}, '
            f'difficulty={self.difficulty}, size={self.size})')

  def spec(self, index) -> dict:
    """The spec of example ``index``: first draw of (seed, split, index) in this split's part."""
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
      raise TypeError(f'{self.name}: index must be an int, got {type(index).__name__}')
    index = int(index)
    if not 0 <= index < self.size:
      raise IndexError(f'{self.name}: index {index} out of range [0, {self.size})')
    for attempt in range(MAX_ATTEMPTS):
      rng = make_rng(self.name, self.seed, self.split, index, attempt)
      task = self.tasks[rng.randrange(len(self.tasks))]
      spec = self.sample_spec(rng, task)
      spec['task'] = task
      spec['difficulty'] = self.difficulty
      if split_of(self.name, spec) == self.split:
        return spec
    raise RuntimeError(f'{self.name}: no {self.split} spec for index {index} after '
                       f'{MAX_ATTEMPTS} draws; the spec space is too small to split')

  # ---- helpers for subclasses
  def image_size(self, rng: random.Random, min_side: int | None = None,
                 max_aspect: float = 3.0) -> tuple[int, int]:
    """(width, height), each side uniform in [min_side, max_side], aspect capped."""
    lo, hi = max(self.min_side, min_side or 0), self.max_side
    lo = min(lo, hi)
    while True:
      w, h = rng.randint(lo, hi), rng.randint(lo, hi)
      if max(w, h) <= max_aspect * min(w, h):
        return w, h

  def image(self, image: Image.Image) -> dict:
    return image_item(image, self.image_format)

  @abc.abstractmethod
  def sample_spec(self, rng: random.Random, task: str) -> dict:
    """Draw every random choice of one example (JSON-like values only)."""

  @abc.abstractmethod
  def render(self, spec: dict) -> dict:
    """Make the record from the spec alone (no randomness)."""

  def record(self, spec: dict, messages: list, answer: str) -> dict:
    """A chat record (see the package docstring for the format)."""
    return {'source': self.name, 'kind': 'chat', 'task': spec['task'], 'messages': messages,
            'answer': answer, 'meta': spec}

  def document(self, spec: dict, items: list) -> dict:
    """A document record: ordered text/image items, no turns, no answer."""
    return {'source': self.name, 'kind': 'document', 'task': spec['task'], 'items': items,
            'answer': '', 'meta': spec}
