"""Answer checking for eval and RL rewards: final-answer extraction, exact match, clicks.

A model's text may hold reasoning between ``THINK_START`` and ``THINK_END``; only the text
after the last ``THINK_END`` is the answer (an unclosed think block has no answer).
"""
from __future__ import annotations

import re

from kimi_vl_jax.data import special_tokens as st

_NUMBER = r'-?\d[\d,]*(?:\.\d+)?'
_ANSWER_IS = re.compile(r'answer\s*(?:is|:)\s*\**\s*(' + _NUMBER + ')', re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)
_POINT = re.compile(r'click\(\s*x\s*=\s*(-?\d*\.?\d+)\s*,\s*y\s*=\s*(-?\d*\.?\d+)\s*\)'
                    r'|\(\s*(-?\d*\.?\d+)\s*,\s*(-?\d*\.?\d+)\s*\)')


def final_text(text: str) -> str | None:
  """The text after the reasoning: after the last THINK_END; None if thinking never closed."""
  if st.THINK_END in text:
    return text.rsplit(st.THINK_END, 1)[1]
  if st.THINK_START in text:
    return None
  return text


def normalize(text: str) -> str:
  """Case-folded, whitespace-collapsed, without surrounding quotes or a final period."""
  text = ' '.join(text.split()).casefold()
  return text.strip().strip('"\'').rstrip('.').strip()


def _to_number(s: str) -> float | None:
  try:
    return float(s.replace(',', ''))
  except ValueError:
    return None


def extract_number(text: str) -> str | None:
  """The final numeric answer: the last 'answer is N', else the last number in the text."""
  final = final_text(text)
  if final is None:
    return None
  hits = _ANSWER_IS.findall(final)
  if hits:
    return hits[-1]
  hits = _ANY_NUMBER.findall(final)
  return hits[-1] if hits else None


def verify(answer: str, text: str) -> bool:
  """True iff ``text`` (a model response, reasoning allowed) ends with the numeric ``answer``.

  Used as the reward of the arithmetic and word problems: numbers compare by value
  ('1,000' == '1000' == '1000.0'); an unclosed think block or no number is wrong.
  """
  got = extract_number(text)
  want, have = _to_number(answer), None if got is None else _to_number(got)
  if want is None:
    raise ValueError(f'verify: answer {answer!r} is not a number')
  return have is not None and abs(have - want) <= 1e-9 * max(1.0, abs(want))


def exact_match(answer: str, text: str) -> bool:
  """Normalized exact match of the final text (after any reasoning) with the answer."""
  final = final_text(text)
  return final is not None and normalize(final) == normalize(answer)


def parse_point(text: str) -> tuple[float, float] | None:
  """(x, y) of the last ``click(x=.., y=..)`` or ``(x, y)`` in the final text, else None."""
  final = final_text(text)
  if final is None:
    return None
  hits = _POINT.findall(final)
  if not hits:
    return None
  a, b, c, d = hits[-1]
  return (float(a), float(b)) if a else (float(c), float(d))


def click_correct(box_xyxy, text: str) -> bool:
  """True iff the predicted point lies in the normalised box (x0, y0, x1, y1)."""
  p = parse_point(text)
  if p is None:
    return False
  x0, y0, x1, y1 = box_xyxy
  return x0 <= p[0] <= x1 and y0 <= p[1] <= y1


NUMERIC_TASKS = ('arithmetic', 'word_problem')


def is_correct(record: dict, text: str) -> bool:
  """Scores a response to a generated chat record by its task's rule.

  gui_click: the point is inside the target button; arithmetic/word_problem: ``verify``;
  every other task: ``exact_match`` with ``record['answer']``.
  """
  task = record['task']
  if task == 'gui_click':
    meta = record['meta']
    return click_correct(meta['boxes'][meta['target']], text)
  if task in NUMERIC_TASKS:
    return verify(record['answer'], text)
  return exact_match(record['answer'], text)
