"""Partial rollouts: the buffer's order and capacity, responses cut at the stop token and at the
response limit, state round trip, and an iteration that continues each waiting response from
its prompt + the tokens so far (a stub decoder that reads the rows it is given)."""
import jax.numpy as jnp
import numpy as np

from kimi_vl_jax.data.generated import get_dataset
from kimi_vl_jax.rl import partial
from kimi_vl_jax.rl import loop as rl_loop

STOP = 99


def test_advance_cuts_at_the_stop_token_and_at_the_response_limit():
  a, b = partial.Group.fresh(0, 2), partial.Group.fresh(1, 2)
  slots = partial.decode_slots([a, b])
  assert slots == [(a, 0), (a, 1), (b, 0), (b, 1)]
  partial.advance(slots, np.array([[1, 2, 3], [4, STOP, 5], [6, 7, 8], [9, 9, 9]]), STOP, 5)
  assert a.responses == [[1, 2, 3], [4, STOP]] and a.done == [False, True]
  assert b.done == [False, False] and not a.complete
  # Next iteration only the pending samples decode; a response stops at 5 tokens.
  slots = partial.decode_slots([a, b])
  assert slots == [(a, 0), (b, 0), (b, 1)]
  partial.advance(slots, np.array([[10, 11, 12], [STOP, 0, 0], [13, 14, 15]]), STOP, 5)
  assert a.responses[0] == [1, 2, 3, 10, 11] and a.complete
  assert b.responses == [[6, 7, 8, STOP], [9, 9, 9, 13, 14]] and b.complete
  assert (a.iterations, b.iterations) == (2, 2)


def test_buffer_serves_oldest_groups_first_within_the_rows_and_round_trips():
  buf = partial.RolloutBuffer()
  old, mid, new = (partial.Group.fresh(i, 4) for i in (7, 8, 9))
  old.done = [True, True, False, False]        # 2 pending
  mid.done = [False] * 4                       # 4 pending
  new.done = [True, False, True, True]         # 1 pending
  buf.put([old, mid, new])
  assert [g.problem for g in buf.groups] == [7, 8, 9]
  state = buf.get_state()
  # 5 rows: old (2) fits, mid (4) does not, and new waits behind it (no overtaking).
  assert [g.problem for g in buf.take(5)] == [7]
  assert [g.problem for g in buf.groups] == [8, 9]
  again = partial.RolloutBuffer()
  again.set_state(state)
  assert again.get_state() == state and [g.problem for g in again.groups] == [7, 8, 9]
  # Complete groups never enter the buffer.
  finished = partial.Group.fresh(3, 2)
  finished.done = [True, True]
  again.put([finished])
  assert [g.problem for g in again.groups] == [7, 8, 9]


def test_plan_fills_the_rows_left_with_fresh_problems():
  buf = partial.RolloutBuffer()
  waiting = partial.Group.fresh(5, 2)
  waiting.done = [True, False]
  buf.put([waiting])
  asked = []
  groups = partial.plan_iteration(buf, 8, 2, lambda n: asked.append(n) or list(range(n)))
  assert asked == [3]                       # 8 rows - 1 pending = 7: three fresh groups of 2
  assert [g.problem for g in groups] == [5, 0, 1, 2] and not buf.groups


class _Tok:
  def decode(self, ids):
    return ' '.join(map(str, ids))


def test_iteration_continues_each_waiting_response_from_its_prompt_and_tokens_so_far():
  """Two iterations of ``_partial_rollout`` with a decoder that writes, for every row, the
  next integers after the row's last token: a continued row's new tokens follow its response
  so far, so the row held prompt + response. Budget 2 of 3 tokens: no group completes in the
  first iteration; in the second the groups complete with 3 tokens each, are scored and leave
  the buffer, and fresh problems fill the rows left."""
  import ml_collections
  from kimi_vl_jax.parallel.mesh import build_mesh
  problems = [get_dataset('math', 'train', 0, tasks=('arithmetic',))[i] for i in range(6)]
  pool = type('Pool', (), {'records': problems})()
  prompts = {i: ([100 + i, 200 + i], []) for i in range(6)}

  def decode(params, extra, batch, key):
    del params, extra, key
    tokens, lens = batch['tokens'], batch['lens']
    last = jnp.take_along_axis(tokens, (lens - 1)[:, None], axis=1)
    return last + 1 + jnp.arange(2)[None, :]

  mesh = build_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1)))
  buf = partial.RolloutBuffer()
  fresh_ids = iter([[0, 1], [2, 3], [4, 5]])
  sample = lambda n: next(fresh_ids)[:n]
  state = type('S', (), {'params': None, 'extra': None})()
  real_prompt = rl_loop.evaluate._prompt
  rl_loop.evaluate._prompt = lambda record, tok, cfg, limit: prompts[problems.index(record)]
  try:
    idx, roll, rows = rl_loop._partial_rollout(
        buf, sample, pool, 2, 2, _Tok(), None, 32, 3, 2, 0, STOP, state, decode, None, mesh)
    assert roll is None and rows == 4 and len(idx) == 0
    assert [g.responses for g in buf.groups] == [[[201, 202]] * 2, [[202, 203]] * 2]
    idx, roll, rows = rl_loop._partial_rollout(
        buf, sample, pool, 2, 2, _Tok(), None, 32, 3, 2, 0, STOP, state, decode, None, mesh)
  finally:
    rl_loop.evaluate._prompt = real_prompt
  # Second iteration: the 4 waiting rows continue (203 = 202 + 1), the response limit of 3
  # cuts the second new token, and no rows are left for fresh problems.
  assert rows == 4 and list(idx) == [0, 1]
  assert roll.response_ids == [[201, 202, 203]] * 2 + [[202, 203, 204]] * 2
  assert roll.prompt_ids == [[100, 200]] * 2 + [[101, 201]] * 2
  np.testing.assert_array_equal(roll.lengths, [[3, 3], [3, 3]])
  assert not roll.finished.any() and not buf.groups
