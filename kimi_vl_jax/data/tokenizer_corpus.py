"""The text the project tokenizer is trained on: generated here, deterministically, no downloads.

``corpus_lines(seed)`` yields the same lines in the same order for the same seed on every
machine (``random.Random`` with an integer seed is stable across platforms and Python 3
versions). The sentences cover what the project's data says: everyday English, shapes and
colours, counting, OCR words and numbers, charts, GUI actions with normalized coordinates,
video timestamps, arithmetic with reasoning, and the chat template's role names.
"""
from __future__ import annotations

import random
from typing import Iterator

from kimi_vl_jax.data import special_tokens as st

_FUNCTION = ('the a an of to in on at by for with from and or but not is are was were be been '
             'has have had do does did can could will would should may might must this that these '
             'those it its they them their there here what which who whom whose where when why how '
             'all any each every some no many much more most few less least one two three first '
             'last next other same than then so if as into over under between above below left '
             'right top bottom after before during while about near far up down out off only also '
             'very just again still yet now').split()
_NOUNS = ('image picture photo figure chart graph table text word number letter button menu window '
          'screen page document video frame object shape circle square triangle rectangle star '
          'line arrow color background foreground answer question step reason result value bar '
          'axis label title caption scene person cat dog car house tree sky water road book cup '
          'phone computer keyboard mouse icon link field box list item file folder time second '
          'minute hour day year problem equation sum product difference total price apple orange '
          'ball box grid row column cell count size area length width height point center corner '
          'edge side direction motion movement story paragraph sentence name city country world').split()
_ADJ = ('red green blue yellow orange purple black white gray brown pink cyan magenta large small '
        'big tiny long short wide narrow tall round bright dark light heavy empty full new old '
        'first second third final correct wrong true false left right upper lower middle visible '
        'hidden open closed important simple complex different similar equal odd even').split()
_VERBS = ('is shows contains describes moves appears points reads writes counts adds subtracts '
          'multiplies divides clicks types opens closes selects scrolls finds compares explains '
          'answers checks verifies computes draws holds lies sits stands rises falls turns').split()
_GUI = ('OK Cancel Submit Save Open Close Search Settings Help Back Next Login Logout Home Delete '
        'Edit Copy Paste Send Reply Download Upload Refresh Menu Profile Cart Checkout').split()
_SYSTEM = ('You are a helpful assistant', 'You are Kimi, an AI assistant created by Moonshot AI.',
           'Answer with a single word.', 'Think step by step.')


def _sentence(rng: random.Random) -> str:
  kind = rng.randrange(10)
  n = lambda: rng.choice(_NOUNS)
  a = lambda: rng.choice(_ADJ)
  f = lambda: rng.choice(_FUNCTION)
  if kind == 0:
    return f'The {a()} {n()} {rng.choice(_VERBS)} {f()} {a()} {n()}.'
  if kind == 1:
    k = rng.randint(0, 20)
    return f'How many {a()} {n()}s are there in the {n()}? There are {k}.'
  if kind == 2:
    x, y = rng.random(), rng.random()
    return (f'Click the "{rng.choice(_GUI)}" button. click(x={x:.3f}, y={y:.3f}) '
            f'<box>({x:.3f},{y:.3f}),({min(1, x + .1):.3f},{min(1, y + .1):.3f})</box>')
  if kind == 3:
    p, q = rng.randint(0, 999), rng.randint(1, 999)
    op = rng.choice('+-*/')
    val = {'+': p + q, '-': p - q, '*': p * q, '/': round(p / q, 3)}[op]
    return (f'{st.THINK_START}First compute {p} {op} {q}. {p} {op} {q} = {val}. '
            f'Check: the result is {val}.{st.THINK_END}The answer is {val}.')
  if kind == 4:
    t = rng.randint(0, 600) / 10
    return f'[{t:.1f}s] The {a()} {n()} moves {rng.choice(("left", "right", "up", "down"))}.'
  if kind == 5:
    words = ' '.join(rng.choice(_NOUNS + _ADJ).upper() if rng.random() < .3 else
                     rng.choice(_NOUNS + _ADJ).capitalize() for _ in range(rng.randint(1, 4)))
    return f'The text in the image reads "{words}" and the number {rng.randint(0, 99999)}.'
  if kind == 6:
    vals = [rng.randint(0, 100) for _ in range(rng.randint(2, 6))]
    return (f'The bar chart has {len(vals)} bars with values {", ".join(map(str, vals))}; '
            f'the tallest is {max(vals)}.')
  if kind == 7:
    return ' '.join(rng.choice(_FUNCTION + _NOUNS + _ADJ + _VERBS)
                    for _ in range(rng.randint(5, 25))).capitalize() + rng.choice('.?!')
  if kind == 8:
    role = rng.choice(st.ROLES)
    return f'{st.ROLE_TOKENS[role]}{role}{st.IM_MIDDLE}{rng.choice(_SYSTEM)}{st.IM_END}'
  return (f'{st.IM_USER}user{st.IM_MIDDLE}{st.MEDIA_START}{st.MEDIA_KIND_IMAGE}{st.MEDIA_CONTENT}'
          f'{st.MEDIA_PAD}{st.MEDIA_END}Describe the {n()}.{st.IM_END}'
          f'{st.IM_ASSISTANT}assistant{st.IM_MIDDLE}A {a()} {n()}.{st.IM_END}')


def corpus_lines(seed: int = 0, num_lines: int = 20000) -> Iterator[str]:
  """Deterministic training lines (some with newlines and tabs, so those get pieces)."""
  rng = random.Random(seed)
  for i in range(num_lines):
    line = ' '.join(_sentence(rng) for _ in range(rng.randint(1, 3)))
    if i % 7 == 0:
      line = line.replace('. ', '.\n', 1)
    if i % 23 == 0:
      line = '\t' + line
    yield line
