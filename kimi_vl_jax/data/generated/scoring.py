"""Answer checking for eval and RL rewards: final-answer extraction, exact match, clicks.

A model's text may hold reasoning between ``THINK_START`` and ``THINK_END``; only the text
after the last ``THINK_END`` is the answer (an unclosed think block has no answer).

``is_correct(record, text)`` is the one entry point: a generated record is scored by its
task's rule; a record carrying a ``'verifier'`` (the user problems of ``rl/problems.py``) by
that entry of ``VERIFIERS`` (``exact``, ``numeric``, ``choice``, ``click``), each a pure
``fn(answer: str, text: str) -> bool``; ``answer_error`` says why an answer cannot be scored.
"""
from __future__ import annotations

import json
import math
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


# A multiple-choice pick. "answer is X" / "answer: X" anywhere (the last one wins): X is "(x)"
# or "[x]" in any case, a capital letter not followed by a letter or digit, or a lower-case
# letter followed only by punctuation or the end -- so "the answer is a cat" picks nothing.
_ANSWER_CHOICE = re.compile(
    r'(?i:answer)\s*(?:(?i:is)|:)\s*[*_]*\s*'
    r'(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Z])(?![A-Za-z0-9])|([a-z])(?=[\s*_]*(?:[.,;:!?)]|$)))')
# Else the final text opens with the pick: "B", "(B)", "[b]", "B.", "B) Paris", "**B**: Paris"
# (a bare letter needs ".", ")" or ":" after it, or nothing: "A cat" is not a pick).
_LEADING_CHOICE = re.compile(
    r'^[\s*_]*(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z])[*_]*(?:[.):](?=\s|$)|\s*$))')


def choice_letter(text: str) -> str | None:
  """The upper-case letter A-Z picked by ``text`` (reasoning allowed), else None.

  The last "answer is X" / "answer: X" of the final text, else a pick that opens it (see the
  two patterns above).
  """
  final = final_text(text)
  if final is None:
    return None
  hits = _ANSWER_CHOICE.findall(final)
  if not hits:
    m = _LEADING_CHOICE.match(final)
    hits = [m.groups()] if m else []
  if not hits:
    return None
  return next(g for g in hits[-1] if g).upper()


def choice_correct(answer: str, text: str) -> bool:
  """True iff ``text`` picks the letter of ``answer`` ("B", "(b)", ...), case-insensitive."""
  want = choice_letter(answer)
  if want is None:
    raise ValueError(f'choice_correct: answer {answer!r} is not a choice letter A-Z')
  return choice_letter(text) == want


def box_error(value) -> str | None:
  """Why ``value`` is not a normalised box [x0, y0, x1, y1] (0 <= x0 < x1 <= 1, same for y)."""
  if (not isinstance(value, (list, tuple)) or len(value) != 4 or any(
      isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)):
    return f'expected a box [x0, y0, x1, y1] of 4 numbers, got {value!r:.60}'
  if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in value):
    return f'box {list(value)} has a coordinate outside [0, 1]'
  x0, y0, x1, y1 = value
  if not (x0 < x1 and y0 < y1):
    return f'box {list(value)} is empty or inverted (needs x0 < x1 and y0 < y1)'
  return None


def parse_box(answer: str) -> tuple[float, float, float, float]:
  """The box of a click answer written as JSON, ``"[x0, y0, x1, y1]"`` (normalised)."""
  try:
    value = json.loads(answer)
  except (TypeError, json.JSONDecodeError):
    value = answer
  why = box_error(value)
  if why is not None:
    raise ValueError(f'parse_box: {why}')
  return tuple(float(v) for v in value)


def box_correct(answer: str, text: str) -> bool:
  """``click_correct`` against the box of a click answer (``parse_box``)."""
  return click_correct(parse_box(answer), text)


# The verifiers a record can name ('verifier' key): fn(answer, text) -> bool.
VERIFIERS = {'exact': exact_match, 'numeric': verify, 'choice': choice_correct,
             'click': box_correct}


def answer_error(verifier: str, answer: str) -> str | None:
  """Why ``answer`` cannot be scored by ``verifier`` (None when it can): checked up front so a
  bad reference answer fails when the problems load, not mid-training."""
  if verifier not in VERIFIERS:
    return f'unknown verifier {verifier!r} (one of {", ".join(VERIFIERS)})'
  if not isinstance(answer, str) or not answer.strip():
    return f'the answer must be a non-empty string, got {answer!r:.60}'
  if verifier == 'numeric':
    number = _to_number(answer.strip())
    if number is None or not math.isfinite(number):      # nan never compares equal
      return f'answer {answer!r:.60} is not a finite number (verifier "numeric")'
  if verifier == 'choice' and choice_letter(answer) is None:
    return f'answer {answer!r:.60} is not a choice letter A-Z (verifier "choice")'
  if verifier == 'click':
    try:
      parse_box(answer)
    except ValueError as e:
      return f'{str(e).removeprefix("parse_box: ")} (verifier "click")'
  return None


NUMERIC_TASKS = ('arithmetic', 'word_problem')


def is_correct(record: dict, text: str) -> bool:
  """Scores a response to a problem record: by its ``'verifier'`` when it names one
  (``VERIFIERS[record['verifier']](record['answer'], text)``), else by its generated task's rule.

  gui_click: the point is inside the target button; arithmetic/word_problem: ``verify``;
  every other task: ``exact_match`` with ``record['answer']``.
  """
  verifier = record.get('verifier')
  if verifier is not None:
    if verifier not in VERIFIERS:
      raise ValueError(f'{record.get("origin")}: unknown verifier {verifier!r} '
                       f'(one of {", ".join(VERIFIERS)})')
    return VERIFIERS[verifier](record['answer'], text)
  task = record['task']
  if task == 'gui_click':
    meta = record['meta']
    return click_correct(meta['boxes'][meta['target']], text)
  if task in NUMERIC_TASKS:
    return verify(record['answer'], text)
  return exact_match(record['answer'], text)
