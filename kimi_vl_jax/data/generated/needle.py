"""Long documents with needles, for long-context training and needle-in-a-haystack checks.

``needle``: a haystack of filler sentences of about ``length`` words holds the sentence
"The secret number of Varno is 4821." at relative depth ``depth`` (a sentence boundary);
the question after the document asks for it. Difficulty 1 and 2 add 2 and 5 distractor
needles for other towns (never the asked-about town). Set ``length`` for the context size
(roughly 1.3 tokens per word with the project tokenizer) and ``depth`` to sweep positions.
"""
from __future__ import annotations

import random

from kimi_vl_jax.data.generated import base, text, vocab

N_DISTRACTORS = (0, 2, 5)
_Q = ('What is the secret number of {key}?', 'According to the document, what is the secret '
      'number of {key}?')


def needle_sentence(key: str, code: int) -> str:
  return f'The secret number of {key} is {code}.'


class NeedleDataset(base.GeneratedDataset):
  """Needle in a haystack (task: needle).

  Extra args: length (haystack words, default 1000), depth (None: uniform per example;
  or a float in [0, 1], 0 = start, 1 = end).
  """
  name = 'needle'
  TASKS = ('needle',)
  DEFAULT_TASKS = TASKS

  def __init__(self, *args, length: int = 1000, depth: float | None = None, **kw):
    super().__init__(*args, **kw)
    if not (isinstance(length, int) and length >= 10):
      raise ValueError(f'needle: length={length!r}; expected an int >= 10 (words)')
    given = depth
    try:       # mixture specs pass strings ('0.5', 'none')
      depth = None if depth in (None, '', 'none', 'None') else float(depth)
    except (TypeError, ValueError):
      depth = -1.0
    if depth is not None and not 0.0 <= depth <= 1.0:
      raise ValueError(f'needle: depth={given!r}; expected None or a float in [0, 1]')
    self.length, self.depth = length, depth

  def sample_spec(self, rng, task):
    keys = rng.sample(vocab.CITIES, 1 + N_DISTRACTORS[self.difficulty])
    codes = [rng.randint(1000, 9999) for _ in keys]
    depth = round(rng.random(), 3) if self.depth is None else float(self.depth)
    return {'length': self.length, 'depth': depth, 'key': keys[0], 'code': codes[0],
            'distractors': tuple(zip(keys[1:], codes[1:])), 'text_seed': rng.getrandbits(63),
            'q': rng.randrange(len(_Q))}

  def haystack(self, spec) -> str:
    rng = random.Random(spec['text_seed'])
    sents = text.filler_sentences(rng, spec['length'])
    for key, code in spec['distractors']:
      sents.insert(rng.randint(0, len(sents)), needle_sentence(key, code))
    at = int(round(spec['depth'] * len(sents)))
    sents.insert(at, needle_sentence(spec['key'], spec['code']))
    return ' '.join(sents)

  def render(self, spec):
    question = _Q[spec['q']].format(key=spec['key'])
    content = [base.text_item(self.haystack(spec) + '\n\n' + question)]
    answer = str(spec['code'])
    return self.record(spec, base.qa_messages(content, answer), answer)


def chance(task: str, difficulty: int) -> float:
  """A uniform guess of a 4-digit code (1000..9999)."""
  return 1.0 / 9000
