"""Plain text documents (pretraining-style) and the filler sentences of long documents.

``text`` (a document record): paragraphs about invented towns, about ``length`` words
(default 200; any length for long-context data). Each paragraph states facts that later
sentences reuse (name, population, a river), so there is structure to learn.
"""
from __future__ import annotations

import random

from kimi_vl_jax.data.generated import base, vocab


def filler_sentence(rng: random.Random) -> str:
  return f'{rng.choice(vocab.SUBJECTS)} {rng.choice(vocab.VERBS)} {rng.choice(vocab.OBJECTS)}.'


def filler_sentences(rng: random.Random, n_words: int) -> list[str]:
  """Sentences totalling at least ``n_words`` words (each ~6-9 words)."""
  out, words = [], 0
  while words < n_words:
    s = filler_sentence(rng)
    out.append(s)
    words += s.count(' ') + 1
  return out


def paragraph(rng: random.Random) -> str:
  town, river = rng.choice(vocab.CITIES), rng.choice(vocab.CITIES)
  people = rng.randint(2, 90) * 100
  name = rng.choice(vocab.NAMES)
  sents = [f'{town} is a town of {people} people on the river {river}.',
           f'{name} has lived in {town} for {rng.randint(2, 40)} years.']
  sents += [filler_sentence(rng) for _ in range(rng.randint(1, 4))]
  sents.append(f'Every spring the people of {town} walk along the {river} to the sea.')
  return ' '.join(sents)


class TextDataset(base.GeneratedDataset):
  """Plain text documents (task: text). Extra arg: length (words, default 200)."""
  name = 'text'
  TASKS = ('text',)
  DEFAULT_TASKS = TASKS

  def __init__(self, *args, length: int = 200, **kw):
    super().__init__(*args, **kw)
    if not (isinstance(length, int) and length >= 1):
      raise ValueError(f'text: length={length!r}; expected an int >= 1 (words)')
    self.length = length

  def sample_spec(self, rng, task):
    return {'length': self.length, 'text_seed': rng.getrandbits(63)}

  def render(self, spec):
    rng = random.Random(spec['text_seed'])
    paras, words = [], 0
    while words < spec['length']:
      p = paragraph(rng)
      paras.append(p)
      words += p.count(' ') + 1
    return self.document(spec, [base.text_item('\n\n'.join(paras))])


def chance(task: str, difficulty: int) -> float:
  """Plain text has no answer to guess."""
  return 0.0
