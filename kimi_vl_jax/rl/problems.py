"""User RL problems (``rl.problems``): JSONL lines -> problem records scored like generated ones.

One problem per line: a chat in any chat format of ``data/sources/formats.py``, told apart by
its keys as the ``auto`` format does -- ``messages`` (with ``images`` and ``<image>``
placeholders, or inline image items), llava (``image`` + ``conversations``), video (``frames``
+ ``messages``) or grounding -- plus these keys:

- ``"answer"``: the reference answer (a string; a number is taken as its text; for ``click``
  also a JSON list). Absent: the text of a final assistant message after the last user turn is
  the answer (any reasoning in think markers before it is dropped, ``scoring.final_text``).
  Neither: an error.
- ``"verifier"``: how a response is scored (``scoring.VERIFIERS``), default ``"exact"``:
  ``exact`` (normalized exact match of the final text, ``scoring.exact_match``), ``numeric``
  (the last number, or "answer is N", equals the answer by value, ``scoring.verify``),
  ``choice`` (the picked letter A-Z -- "B", "(B)", "answer is B" -- equals the answer's,
  case-insensitive, ``scoring.choice_correct``), ``click`` (the answer is a box
  ``[x0, y0, x1, y1]`` in [0, 1]; the response's ``click(x=.., y=..)`` or ``(x, y)`` must fall
  inside it, ``scoring.click_correct``).
- ``"difficulty"``: an optional integer label (default 0; larger = harder) that
  ``rl.difficulties`` filters by and the curriculum sampler orders by.

The prompt is every message up to and including the last user turn; what follows it (a final
answer, a worked solution) is never shown to the policy. Relative image paths resolve against
the JSONL file's directory. Examples::

  {"messages": [{"role": "user", "content": "What is 17 + 25?"}], "answer": "42",
   "verifier": "numeric", "difficulty": 1}
  {"messages": [{"role": "user", "content": "<image>Which shape is red? (A) circle (B) square"}],
   "images": ["img/0.png"], "answer": "B", "verifier": "choice"}
  {"image": "shot.png", "conversations": [{"from": "human", "value": "<image>\\nClick Save."},
   {"from": "gpt", "value": "[0.70, 0.90, 0.80, 0.95]"}], "verifier": "click"}

Each line becomes the record the rest of the RL code reads from a generated problem
(``evaluate._prompt`` drops the last message; ``scoring.is_correct`` reads the verifier)::

  {'source': 'rl.problems', 'kind': 'chat', 'task': 'problems',
   'messages': [prompt messages..., {'role': 'assistant', 'content': [answer text item]}],
   'answer': str, 'verifier': str, 'difficulty': int,
   'meta': {'task', 'difficulty', 'verifier'}, 'origin': 'path:line'}

Bad input is never skipped: the first bad line raises ``DataError`` whose message starts with
``path:line`` and says what is wrong (bad JSON, an unknown verifier, a missing or unusable
answer, a missing image file, no user turn, ...), when the pool is built.
"""
from __future__ import annotations

import collections
import json
from typing import Sequence

import numpy as np
from absl import logging

from kimi_vl_jax.data.generated import scoring
from kimi_vl_jax.data.sources.base import BadRecord, DataError, JsonlSource, expand_paths
from kimi_vl_jax.data.sources.formats import parse_auto

SOURCE = 'rl.problems'
TASK = 'problems'
DEFAULT_VERIFIER = 'exact'


def _bad(origin: str, message: str) -> BadRecord:
  return BadRecord('invalid_record', message, origin)


def _text_of(message: dict, origin: str) -> str:
  """The text of a parsed message (its text items joined); images make it unusable as an answer."""
  if any(it['type'] == 'image' for it in message['content']):
    raise _bad(origin, 'the final assistant message holds an image; give the answer as "answer"')
  return ''.join(it['text'] for it in message['content'])


def _answer(obj: dict, messages: list, last_user: int, verifier: str, origin: str) -> str:
  """The reference answer as a string: ``"answer"``, else a final assistant message's text."""
  if 'answer' in obj:
    value = obj['answer']
    if verifier == 'click' and isinstance(value, list):
      value = json.dumps(value)          # "[x0, y0, x1, y1]": JSON, as parse_box reads it
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      value = str(value)
    elif not isinstance(value, str):
      raise _bad(origin, f'"answer" must be a string, got {type(value).__name__}')
    return value.strip()
  if len(messages) - 1 > last_user and messages[-1]['role'] == 'assistant':
    final = scoring.final_text(_text_of(messages[-1], origin))
    if final is None:
      raise _bad(origin, 'the final assistant message opens a think block and never closes it, '
                 'so it has no answer; give "answer"')
    return final.strip()
  raise _bad(origin, 'missing answer: no "answer" key and no final assistant message after the '
             'last user turn')


def parse_problem(obj: dict, origin: str, base_dir: str) -> dict:
  """One JSON line -> a problem record (module docstring); raises ``BadRecord`` naming ``origin``.

  Args:
    obj: the line's JSON object.
    origin: ``'path:line'``, the start of every error message.
    base_dir: directory that relative image paths resolve against (the JSONL file's).
  """
  verifier = obj.get('verifier', DEFAULT_VERIFIER)
  if not isinstance(verifier, str) or verifier not in scoring.VERIFIERS:
    raise _bad(origin, f'unknown verifier {verifier!r} (one of {", ".join(scoring.VERIFIERS)})')
  difficulty = obj.get('difficulty', 0)
  if isinstance(difficulty, bool) or not isinstance(difficulty, int):
    raise _bad(origin, f'"difficulty" must be an integer, got {difficulty!r:.40}')
  chat = parse_auto(obj, origin, base_dir)        # the data sources' parsers, images resolved
  if chat['kind'] != 'chat':
    raise _bad(origin, 'a problem must be a chat (messages, llava, video or grounding format); '
               'this line parses as a document')
  messages = chat['messages']
  users = [i for i, m in enumerate(messages) if m['role'] == 'user']
  if not users:
    raise _bad(origin, 'no user turn: the prompt is every message up to the last user turn')
  last_user = users[-1]
  if not messages[last_user]['content']:
    raise _bad(origin, 'the last user turn is empty')
  answer = _answer(obj, messages, last_user, verifier, origin)
  why = scoring.answer_error(verifier, answer)
  if why is not None:
    raise _bad(origin, why)
  if verifier == 'choice':
    answer = scoring.choice_letter(answer)   # "(b)" -> "B": one spelling in the record
  return {'source': SOURCE, 'kind': 'chat', 'task': TASK,
          'messages': messages[:last_user + 1] + [
              {'role': 'assistant', 'content': [{'type': 'text', 'text': answer}]}],
          'answer': answer, 'verifier': verifier, 'difficulty': difficulty,
          'meta': {'task': TASK, 'difficulty': difficulty, 'verifier': verifier},
          'origin': origin}


def load_problems(pattern: str | Sequence[str]) -> list[dict]:
  """Every problem of the JSONL files ``pattern`` names (a path, glob or comma-separated list;
  ``expand_paths``), in file then line order. Blank lines are ignored; the first bad line raises
  ``DataError`` ('path:line: reason: what')."""
  # strict: the first bad line raises (DataError) instead of being counted and skipped.
  source = JsonlSource(SOURCE, pattern, parse_problem, strict=True)
  return [source[i] for i in range(len(source))]


def select(records: list[dict], difficulties: Sequence[int], max_per_difficulty: int,
           where: str = SOURCE) -> tuple[list[dict], np.ndarray]:
  """The pool: records whose difficulty is in ``difficulties``, the first ``max_per_difficulty``
  of each in file order. Returns (records [N], difficulty int32 [N]); raises ``DataError`` when
  nothing is left (``where`` names the files)."""
  wanted = {int(d) for d in difficulties}
  taken: collections.Counter = collections.Counter()
  out = []
  for r in records:
    d = r['difficulty']
    if d in wanted and taken[d] < max_per_difficulty:
      taken[d] += 1
      out.append(r)
  if not out:
    found = sorted(collections.Counter(r['difficulty'] for r in records).items())
    raise DataError(f'{where}: no problem left after the difficulty filter rl.difficulties='
                    f'{tuple(sorted(wanted))}; the files hold {len(records)} problems with '
                    f'(difficulty, count) {found}')
  dropped = len(records) - len(out)
  if dropped:
    logging.info('%s: %d of %d problems are in the pool (rl.difficulties=%s, at most %d each)',
                 where, len(out), len(records), tuple(sorted(wanted)), max_per_difficulty)
  for d in sorted(wanted - set(taken)):
    logging.warning('%s: no problem has difficulty %d (in rl.difficulties)', where, d)
  return out, np.asarray([r['difficulty'] for r in out], np.int32)


def _num_images(record: dict) -> int:
  return sum(it['type'] == 'image' for m in record['messages'] for it in m['content'])


def load_pool(pattern: str, difficulties: Sequence[int], max_per_difficulty: int,
              text_only: bool = False) -> tuple[list[dict], np.ndarray]:
  """``select(load_problems(pattern), ...)``; ``text_only`` (an ``lm`` policy, which cannot see
  images) makes a pooled problem with an image an error naming its line."""
  try:
    files = expand_paths(pattern)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'rl.problems={pattern!r}: {e}') from None
  records, difficulty = select(load_problems(files), difficulties, max_per_difficulty,
                               where=', '.join(files))
  if text_only:
    for r in records:
      if _num_images(r):
        raise DataError(f'{r["origin"]}: invalid_record: the problem has {_num_images(r)} '
                        "image(s) but rl.model='lm' cannot see images")
  return records, difficulty
