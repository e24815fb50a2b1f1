"""Arithmetic and multi-step word problems with verifiable answers and reasoning traces.

The assistant turn is ``THINK_START`` + step-by-step reasoning (plan, column arithmetic,
a check of the result) + ``THINK_END`` + ``"The answer is N."``; with ``think=False`` it
is only the final sentence. ``record['answer']`` is the integer as text and
``scoring.verify(answer, response)`` scores any response (the RL reward).

``arithmetic``: difficulty 0: a + b or a - b with a, b in 0..99; 1: three terms of +/-
with terms up to 999; 2: (a op b) * c op d.
``word_problem``: templated stories of 2 (difficulty 0), 2-3 (1) or 3-4 (2) steps.
"""
from __future__ import annotations

from kimi_vl_jax.data import special_tokens as st
from kimi_vl_jax.data.generated import base, vocab

TERM_MAX = (99, 999, 99)
_Q_ARITH = ('What is {expr}?', 'Compute {expr}.', 'Calculate {expr}.')


def _column_steps(a: int, b: int, op: str) -> list[str]:
  """Digit-by-digit reasoning for a + b or a - b (a >= b for '-'), least significant first."""
  steps, carry = [], 0
  da, db = str(a)[::-1], str(b)[::-1]
  for i in range(max(len(da), len(db))):
    x = int(da[i]) if i < len(da) else 0
    y = int(db[i]) if i < len(db) else 0
    place = ('ones', 'tens', 'hundreds', 'thousands', 'ten-thousands')[min(i, 4)]
    if op == '+':
      s = x + y + carry
      extra = f' + {carry} carried' if carry else ''
      steps.append(f'{place}: {x} + {y}{extra} = {s}, write {s % 10}'
                   + (', carry 1' if s >= 10 else ''))
      carry = s // 10
    else:
      s = x - y - carry
      extra = f' - {carry} borrowed' if carry else ''
      borrow = s < 0
      steps.append(f'{place}: {x} - {y}{extra}' + (f', borrow 10: {s + 10}' if borrow else f' = {s}'))
      carry = int(borrow)
  if op == '+' and carry:
    steps.append('the final carry 1 becomes the leading digit')
  return steps


def binary_step(a: int, op: str, b: int) -> tuple[int, str]:
  """(result, one reasoning sentence) for a op b."""
  if op == '*':
    r = a * b
    if b >= 10:
      parts = f'{a} * {b // 10 * 10} = {a * (b // 10 * 10)} and {a} * {b % 10} = {a * (b % 10)}'
      return r, f'{a} * {b}: {parts}, so {a} * {b} = {r}.'
    return r, f'{a} * {b} = {r}.'
  r = a + b if op == '+' else a - b
  # Reduce to column arithmetic on non-negative numbers x (+|-) y with x >= y for '-'.
  if a >= 0 and op == '+':
    x, cop, y, how = a, '+', b, ''
  elif a >= 0:
    x, cop, y, how = (a, '-', b, '') if a >= b else (b, '-', a, f'{a} - {b} is negative')
  elif op == '-':
    x, cop, y, how = -a, '+', b, f'{a} - {b} is negative, the sum of {-a} and {b} with a minus'
  else:
    x, cop, y, how = ((b, '-', -a, f'{a} + {b} = {b} - {-a}') if b >= -a else
                      (-a, '-', b, f'{a} + {b} is negative, {-a} - {b} with a minus'))
  v = x + y if cop == '+' else x - y
  cols = f'{x} {cop} {y}: ' + '; '.join(_column_steps(x, y, cop)) + f', so {x} {cop} {y} = {v}'
  return r, (f'{how}. ' if how else '') + cols + (f'. So {a} {op} {b} = {r}.' if how else '.')


def check_sentence(a: int, op: str, b: int, r: int) -> str:
  """A reflection step that verifies a op b = r by the inverse operation."""
  if op == '+':
    return f'Check: {r} - {b} = {r - b}, which is {a}. Correct.'
  if op == '-':
    return f'Check: {r} + {b} = {r + b}, which is {a}. Correct.'
  if b:
    return f'Check: {r} / {b} = {r // b}, which is {a}. Correct.'
  return 'Check: anything times 0 is 0. Correct.'


def _arith_spec(rng, d):
  if d == 0:
    return {'terms': (rng.randint(0, 99), rng.randint(0, 99)), 'ops': (rng.choice('+-'),)}
  if d == 1:
    return {'terms': tuple(rng.randint(0, 999) for _ in range(3)),
            'ops': (rng.choice('+-'), rng.choice('+-'))}
  return {'terms': (rng.randint(1, 99), rng.randint(1, 99), rng.randint(2, 12), rng.randint(0, 99)),
          'ops': (rng.choice('+-'), '*', rng.choice('+-'))}


def arith_expression(spec) -> str:
  t, o = spec['terms'], spec['ops']
  if len(t) == 4:
    return f'({t[0]} {o[0]} {t[1]}) * {t[2]} {o[2]} {t[3]}'
  return ' '.join([str(t[0])] + [f'{op} {x}' for op, x in zip(o, t[1:])])


def arith_solution(spec) -> tuple[int, list[str]]:
  """(value, reasoning lines) evaluating left to right (the parentheses come first)."""
  t, o = spec['terms'], spec['ops']
  expr = arith_expression(spec)
  lines = [f'I need to compute {expr}. I will go one operation at a time.']
  acc = t[0]
  for op, x in zip(o, t[1:]):
    r, sentence = binary_step(acc, op, x)
    lines += [sentence, check_sentence(acc, op, x, r)]
    acc = r
  return acc, lines


# Word problems: four story templates, then 0-2 extra "later" steps.
_SUBJECT = {0: 'name', 1: 'name', 2: 'they', 3: 'each friend'}


def _word_spec(rng, d):
  hi = (20, 100, 100)[d]
  name, other = rng.sample(vocab.NAMES, 2)
  kind = rng.randrange(4)
  if kind == 0:
    nums = (rng.randint(1, hi), rng.randint(2, 9), rng.randint(2, 9))
  elif kind == 1:
    a = rng.randint(2, hi)
    nums = (a, rng.randint(1, a), rng.randint(1, hi))
  elif kind == 2:
    nums = (rng.randint(1, hi), rng.randint(1, hi), 0)
  else:
    n = rng.randint(2, 9)
    nums = (n, n * rng.randint(1, 12), rng.randint(1, 9))
  spec = {'kind': kind, 'name': name, 'other': other, 'item': rng.choice(vocab.ITEMS),
          'nums': nums, 'extra': ()}
  value = word_problem(spec)[1]
  extra = []
  for _ in range((0, rng.randint(0, 1), rng.randint(1, 2))[d]):
    k = rng.randint(1, 9)
    give = k <= value and rng.random() < 0.5        # never below zero
    extra.append(('give', k) if give else ('find', k))
    value += -k if give else k
  spec['extra'] = tuple(extra)
  return spec


def word_problem(spec) -> tuple[str, int, list[str]]:
  """(problem text, answer, reasoning lines)."""
  name, other, item, (a, b, c) = spec['name'], spec['other'], spec['item'], spec['nums']
  lines = []

  def step(x, op, y, what):
    r, sentence = binary_step(x, op, y)
    lines.append(f'{what}: {sentence}')
    lines.append(check_sentence(x, op, y, r))
    return r

  kind = spec['kind']
  if kind == 0:
    story = f'{name} has {a} {item}. {name} buys {b} packs with {c} {item} in each pack.'
    lines.append(f'Plan: first the {item} in the packs, then add what {name} had.')
    v = step(a, '+', step(b, '*', c, 'Packs'), 'Total')
  elif kind == 1:
    story = f'{name} has {a} {item} and gives {b} to {other}. Then {name} finds {c} more.'
    lines.append(f'Plan: subtract what {name} gave away, then add what {name} found.')
    v = step(step(a, '-', b, 'After giving'), '+', c, 'After finding')
  elif kind == 2:
    story = f'{name} has {a} {item}. {other} has {b} more {item} than {name}.'
    lines.append(f'Plan: find how many {other} has, then add both amounts.')
    v = step(a, '+', step(a, '+', b, f'{other} has'), 'Together')
  else:
    story = f'{a} friends share {b} {item} equally. Then each friend gets {c} more.'
    lines.append('Plan: divide to find each share, then add the extra.')
    share = b // a
    lines.append(f'Each share: {b} / {a} = {share}. Check: {share} * {a} = {b}. Correct.')
    v = step(share, '+', c, 'Each friend')
  who = name if _SUBJECT[kind] == 'name' else _SUBJECT[kind]
  plural = who == 'they'
  for verb, k in spec['extra']:
    words = {'give': 'give away' if plural else 'gives away', 'find': 'find' if plural else 'finds'}
    story += f' Later {who} {words[verb]} {k} {item}.'
    v = step(v, '-' if verb == 'give' else '+', k, f'After {who} {words[verb]} {k}')
  question = {0: f'How many {item} does {name} have now?',
              1: f'How many {item} does {name} have now?',
              2: f'How many {item} do they have together now?',
              3: f'How many {item} does each friend have now?'}[kind]
  lines.append(f'Let me reread the question: it asks for the final number of {item}, which is {v}.')
  return f'{story} {question}', v, lines


class ArithmeticDataset(base.GeneratedDataset):
  """Arithmetic and word problems with reasoning traces (tasks: arithmetic, word_problem).

  Extra arg: think (default True): include the THINK_START..THINK_END trace.
  """
  name = 'math'
  TASKS = ('arithmetic', 'word_problem')
  DEFAULT_TASKS = TASKS

  def __init__(self, *args, think: bool = True, **kw):
    super().__init__(*args, **kw)
    self.think = base.as_bool('math: think', think)

  def sample_spec(self, rng, task):
    d = self.difficulty
    spec = _arith_spec(rng, d) if task == 'arithmetic' else _word_spec(rng, d)
    spec['q'] = rng.randrange(len(_Q_ARITH))
    return spec

  def solve(self, spec) -> tuple[str, int, list[str]]:
    """(question, answer, reasoning lines) of a spec."""
    if spec['task'] == 'arithmetic':
      value, lines = arith_solution(spec)
      return _Q_ARITH[spec['q']].format(expr=arith_expression(spec)), value, lines
    return word_problem(spec)

  def render(self, spec):
    question, value, lines = self.solve(spec)
    final = f'The answer is {value}.'
    response = (f'{st.THINK_START}' + '\n'.join(lines) + f'{st.THINK_END}{final}'
                if self.think else final)
    record = self.record(spec, base.qa_messages([base.text_item(question)], response), str(value))
    record['prompt'] = question
    return record


def chance(task: str, difficulty: int) -> float:
  """Guessing an unbounded integer: 0 (no uniform baseline exists)."""
  return 0.0
