"""User RL problems (rl/problems.py): each chat format and verifier parses into a record the RL
code reads like a generated one; every bad line is an error naming file:line; the verifiers
score through scoring.is_correct; ProblemPool.from_config builds the pool from rl.problems."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from kimi_vl_jax.config import ConfigError, base_config
from kimi_vl_jax.data import special_tokens as st
from kimi_vl_jax.data.generated import is_correct, scoring
from kimi_vl_jax.data.sources.base import DataError
from kimi_vl_jax.rl import problems, rollout

THINK = f'{st.THINK_START}let me count{st.THINK_END}'
USER = lambda text: {'role': 'user', 'content': text}
ASSISTANT = lambda text: {'role': 'assistant', 'content': text}


def _write(path, lines):
  """JSONL with one line per entry: dicts as JSON, strings verbatim (for broken lines)."""
  with open(path, 'w') as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + '\n')
  return str(path)


@pytest.fixture
def image_dir(tmp_path):
  os.makedirs(tmp_path / 'img')
  Image.new('RGB', (24, 16), 'red').save(tmp_path / 'img' / 'red.png')
  return tmp_path


def _prompt_texts(record):
  """Text of every message but the last (what evaluate._prompt shows the policy)."""
  return [[it.get('text', '<img>') for it in m['content']] for m in record['messages'][:-1]]


def test_messages_format_with_images_and_every_key(image_dir):
  path = _write(image_dir / 'p.jsonl', [
      {'messages': [{'role': 'system', 'content': 'Be brief.'},
                    USER('<image>Which shape? (A) circle (B) square'),
                    ASSISTANT('A worked solution the policy must not see.')],
       'images': ['img/red.png'], 'answer': '(b)', 'verifier': 'choice', 'difficulty': 2}])
  [r] = problems.load_problems(path)
  assert r['kind'] == 'chat' and r['task'] == 'problems' and r['source'] == 'rl.problems'
  assert r['origin'] == f'{path}:1' and r['difficulty'] == 2 and r['verifier'] == 'choice'
  assert r['answer'] == 'B'                        # one spelling of the letter
  # The prompt is every message up to the last user turn; the last message is the answer.
  assert [m['role'] for m in r['messages']] == ['system', 'user', 'assistant']
  assert _prompt_texts(r) == [['Be brief.'], ['<img>', 'Which shape? (A) circle (B) square']]
  assert r['messages'][-1]['content'] == [{'type': 'text', 'text': 'B'}]
  image = r['messages'][1]['content'][0]['image']
  assert image == os.path.join(str(image_dir), 'img', 'red.png')   # relative to the file


def test_llava_format_answer_from_the_final_assistant_message(image_dir):
  path = _write(image_dir / 'p.jsonl', [
      {'image': 'img/red.png', 'conversations': [
          {'from': 'human', 'value': '<image>\nClick the red square.'},
          {'from': 'gpt', 'value': f'{THINK} [0.1, 0.2, 0.5, 0.6]'}], 'verifier': 'click'},
      {'conversations': [{'from': 'human', 'value': 'What is 6 x 7?'},
                         {'from': 'gpt', 'value': '42'}], 'verifier': 'numeric'}])
  click, numeric = problems.load_problems(path)
  assert _prompt_texts(click) == [['<img>', 'Click the red square.']]   # LLaVA's newline dropped
  assert click['answer'] == '[0.1, 0.2, 0.5, 0.6]'      # the reasoning is not part of the answer
  assert numeric['answer'] == '42' and numeric['origin'] == f'{path}:2'
  assert [m['role'] for m in numeric['messages']] == ['user', 'assistant']
  assert numeric['difficulty'] == 0                      # the default label


def test_defaults_and_answer_types(tmp_path):
  path = _write(tmp_path / 'p.jsonl', [
      {'messages': [USER('Capital of France?')], 'answer': ' Paris '},
      {'messages': [USER('2 + 2?')], 'answer': 4, 'verifier': 'numeric'},
      {'messages': [USER('Click OK.')], 'answer': [0, 0.5, 0.25, 1], 'verifier': 'click'},
      '',                                                # blank lines are not problems
      {'messages': [USER('first'), ASSISTANT('x'), USER('second')], 'answer': 'y'}])
  exact, num, click, multi = problems.load_problems(path)
  assert exact['verifier'] == 'exact' and exact['answer'] == 'Paris'
  assert num['answer'] == '4'
  assert scoring.parse_box(click['answer']) == (0.0, 0.5, 0.25, 1.0)
  assert multi['origin'] == f'{path}:5'
  assert _prompt_texts(multi) == [['first'], ['x'], ['second']]


@pytest.mark.parametrize('verifier,answer,right,wrong', [
    ('exact', 'Paris', [f'{THINK} paris.', '"Paris"'], ['Lyon', f'{st.THINK_START}Paris']),
    ('numeric', '1000', [f'{THINK} The answer is 1,000.', '1000.0'], ['999', 'no idea']),
    ('choice', 'B', ['B', '(b)', f'{THINK} The answer is (B).', 'answer: b', 'B. square'],
     ['A', 'the answer is a cat', '(A) circle', f'{st.THINK_START}B']),
    ('click', '[0.1, 0.2, 0.5, 0.6]', ['click(x=0.3, y=0.4)', f'{THINK} (0.5, 0.2)'],
     ['click(x=0.6, y=0.4)', 'the save button']),
])
def test_each_verifier_scores_through_is_correct(tmp_path, verifier, answer, right, wrong):
  path = _write(tmp_path / 'p.jsonl', [{'messages': [USER('q?')], 'answer': answer,
                                        'verifier': verifier}])
  [record] = problems.load_problems(path)
  for text in right:
    assert is_correct(record, text), (verifier, text)
  for text in wrong:
    assert not is_correct(record, text), (verifier, text)


def test_generated_records_keep_their_task_rules():
  """No 'verifier' key: the generated tasks' rules, unchanged (an exact task is not numeric)."""
  record = {'task': 'count', 'answer': '3'}
  assert is_correct(record, '3') and not is_correct(record, 'It is 3')
  assert is_correct({'task': 'arithmetic', 'answer': '3'}, 'It is 3')


# (line, what the error must say). Each bad line is line 2, after a good one.
BAD_LINES = [
    ('{"messages": [', 'invalid JSON'),
    ({'messages': [USER('q')], 'answer': 'a', 'verifier': 'regex'},
     "unknown verifier 'regex' (one of exact, numeric, choice, click)"),
    ({'messages': [USER('q')], 'answer': 'twelve', 'verifier': 'numeric'},
     "answer 'twelve' is not a finite number"),
    ('{"messages": [{"role": "user", "content": "q"}], "answer": NaN, "verifier": "numeric"}',
     "answer 'nan' is not a finite number"),
    ({'messages': [USER('q')]}, 'missing answer'),
    ({'messages': [USER('q')], 'answer': ''}, 'non-empty string'),
    ({'messages': [USER('q')], 'answer': ['a']}, '"answer" must be a string'),
    ({'messages': [USER('q')], 'answer': 'AB', 'verifier': 'choice'}, 'not a choice letter'),
    ({'messages': [USER('q')], 'answer': [0.5, 0.5, 0.2, 0.9], 'verifier': 'click'},
     'empty or inverted'),
    ({'messages': [USER('q')], 'answer': '[0, 0, 2, 1]', 'verifier': 'click'},
     'outside [0, 1]'),
    ({'messages': [USER('q')], 'answer': 'here', 'verifier': 'click'}, 'expected a box'),
    ({'messages': [USER('<image>q')], 'images': ['img/missing.png'], 'answer': 'a'},
     "missing_image: image file 'img/missing.png' not found"),
    ({'messages': [USER('<image>q')], 'answer': 'a'}, 'image_count_mismatch'),
    ({'messages': [{'role': 'system', 'content': 's'}, ASSISTANT('a')], 'answer': 'a'},
     'no user turn'),
    ({'messages': [USER('q')], 'answer': 'a', 'difficulty': 'hard'},
     '"difficulty" must be an integer'),
    ({'text': 'a plain document'}, 'must be a chat'),
    ({'question': 'q', 'answer': 'a'}, 'cannot tell the format'),
    ({'conversations': [{'from': 'human', 'value': 'q'},
                        {'from': 'gpt', 'value': f'{st.THINK_START}still thinking'}]},
     'never closes'),
]


@pytest.mark.parametrize('line,what', BAD_LINES, ids=[w[:24] for _, w in BAD_LINES])
def test_bad_lines_raise_naming_file_and_line(image_dir, line, what):
  path = _write(image_dir / 'bad.jsonl', [{'messages': [USER('ok')], 'answer': 'ok'}, line])
  with pytest.raises(DataError) as info:
    problems.load_problems(path)
  msg = str(info.value)
  assert msg.startswith(f'{path}:2: ') and what in msg, msg


def test_pool_filters_and_caps_by_difficulty(tmp_path):
  a = _write(tmp_path / 'a.jsonl', [{'messages': [USER(f'a{i}')], 'answer': str(i),
                                     'difficulty': i % 3} for i in range(9)])
  b = _write(tmp_path / 'b.jsonl', [{'messages': [USER('b0')], 'answer': '0', 'difficulty': 7}])
  records, difficulty = problems.load_pool(f'{tmp_path}/*.jsonl', (0, 2, 7), 2)
  # File then line order; at most 2 of each difficulty; difficulty 1 filtered out.
  assert [r['answer'] for r in records] == ['0', '2', '3', '5', '0']
  assert difficulty.dtype == np.int32 and difficulty.tolist() == [0, 2, 0, 2, 7]
  records, _ = problems.load_pool(f'{b},{a}', (0, 1, 2, 7), 100)    # a comma-separated list
  assert len(records) == 10 and records[0]['origin'] == f'{b}:1'
  with pytest.raises(DataError, match=r'a\.jsonl: no problem left after the difficulty filter '
                     r'rl\.difficulties=\(5,\); the files hold 9 problems'):
    problems.load_pool(a, (5,), 10)
  with pytest.raises(FileNotFoundError, match='rl.problems'):
    problems.load_pool(str(tmp_path / 'none*.jsonl'), (0,), 1)


def test_a_bad_line_fails_even_when_its_difficulty_is_filtered_out(tmp_path):
  path = _write(tmp_path / 'p.jsonl', [
      {'messages': [USER('q')], 'answer': 'a'},
      {'messages': [USER('q')], 'answer': 'a', 'verifier': 'nope', 'difficulty': 9}])
  with pytest.raises(DataError, match=r'p\.jsonl:2: .*unknown verifier'):
    problems.load_pool(path, (0,), 10)


def test_lm_policy_rejects_problems_with_images(image_dir):
  path = _write(image_dir / 'p.jsonl', [
      {'messages': [USER('text only')], 'answer': 'a'},
      {'messages': [USER('<image>look')], 'images': ['img/red.png'], 'answer': 'a'}])
  assert len(problems.load_pool(path, (0,), 10)[0]) == 2
  with pytest.raises(DataError, match=r"p\.jsonl:2: .*1 image\(s\) but rl\.model='lm'"):
    problems.load_pool(path, (0,), 10, text_only=True)


def _config(path, **rl):
  c = base_config('tiny')
  c.rl.problems = path
  c.rl.update(rl)
  return c


def test_problem_pool_from_config_uses_rl_problems(tmp_path):
  path = _write(tmp_path / 'p.jsonl', [
      {'messages': [USER(f'q{i}')], 'answer': str(i), 'verifier': 'numeric',
       'difficulty': d} for i, d in enumerate([3, 1, 3, 1, 4])])
  # rl.dataset / rl.tasks would be invalid for generated problems: they are not read.
  pool = rollout.ProblemPool.from_config(_config(path, difficulties=(1, 3), dataset='imagenet',
                                                 problems_per_difficulty=8))
  assert [r['answer'] for r in pool.records] == ['0', '1', '2', '3']
  np.testing.assert_array_equal(pool.difficulty, [3, 1, 3, 1])
  assert all(r['verifier'] == 'numeric' for r in pool.records)
  pool.check_fits('rl', global_batch=8, k=2)           # 4 problems an iteration: fits
  with pytest.raises(ConfigError, match=r'^config\.stages\.rl\.global_batch: 10 rows need 5 '
                     r'distinct problems an iteration, but the pool holds 4'):
    pool.check_fits('rl', global_batch=10, k=2)


def test_problem_pool_from_config_without_rl_problems_is_generated():
  c = base_config('tiny')
  c.rl.difficulties, c.rl.problems_per_difficulty = (0,), 3
  pool = rollout.ProblemPool.from_config(c)
  assert len(pool.records) == 3 and all('verifier' not in r for r in pool.records)
  assert all(r['task'] in ('arithmetic', 'word_problem') for r in pool.records)
