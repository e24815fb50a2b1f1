"""Rollout host code: responses cut at the stop token and scored; training rows mask only
the response and pad with weight-0 rows."""
import numpy as np

from kimi_vl_jax.data.generated import get_dataset
from kimi_vl_jax.rl import rollout


class _Tok:
  def decode(self, ids):
    return ''.join(chr(ord('0') + i) for i in ids)


def test_collect_cuts_at_the_stop_token_and_scores_with_the_verifier():
  problems = [get_dataset('math', 'train', 0, tasks=('arithmetic',))[i] for i in range(2)]
  answers = [p['answer'] for p in problems]
  stop = 99
  digits = lambda s: [int(ch) for ch in s]
  new = np.full((4, 8), 7, np.int32)
  new[0, :len(answers[0]) + 1] = digits(answers[0]) + [stop]      # right, finished
  new[1, :2] = [stop, 1]                                          # empty answer, finished
  new[2, :] = 5                                                   # never stops
  new[3, :len(answers[1]) + 1] = digits(answers[1]) + [stop]
  prompts = [([1, 2, 3], []), ([1, 2, 3], []), ([4, 5], []), ([4, 5], [])]
  roll = rollout.collect(problems, 2, prompts, new, _Tok(), stop)
  np.testing.assert_array_equal(roll.correct, [[1, 0], [0, 1]])
  np.testing.assert_array_equal(roll.lengths, [[len(answers[0]) + 1, 1], [8, len(answers[1]) + 1]])
  np.testing.assert_array_equal(roll.finished, [[True, True], [False, True]])
  assert roll.response_ids[1] == [stop] and roll.texts[1] == ''

  rows = rollout.training_rows(roll, seq_len=16, patches=0, batch=6)
  assert rows['tokens'].shape == (6, 16)
  np.testing.assert_array_equal(rows['rl_weight'], [1, 1, 1, 1, 0, 0])
  n0 = 3 + len(answers[0]) + 1
  np.testing.assert_array_equal(rows['tokens'][0, :n0], [1, 2, 3] + digits(answers[0]) + [stop])
  np.testing.assert_array_equal(rows['loss_mask'][0], [0] * 3 + [1] * (n0 - 3) + [0] * (16 - n0))
  np.testing.assert_array_equal(rows['segment_ids'][0], [1] * n0 + [0] * (16 - n0))
  np.testing.assert_array_equal(rows['loss_mask'][2, :10], [0, 0] + [1] * 8)
