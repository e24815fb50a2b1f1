"""Partial rollouts (SPEC §5, Kimi k1.5): a per-iteration token budget; unfinished responses
continue in the next iteration.

With ``rl.partial_rollout_tokens`` = B > 0 an iteration decodes at most B new tokens a row
instead of the whole ``rl.max_response_tokens`` (M). A problem's group of k samples is scored,
and trained on, once all k responses have ended (produced ``<|im_end|>`` or reached M tokens);
until then the group waits in a ``RolloutBuffer``. Next iteration its unfinished samples take
decode rows first (oldest group first), each continuing from its prompt + the response so far,
and the rows left go to fresh problems, k rows each. So one long response no longer holds the
whole batch's decoding to M tokens, and the short responses of an iteration train at once.

A continued response's earlier tokens were sampled by an earlier policy; the mirror-descent
loss takes the whole response against the current reference (pi_i), as for fresh ones. The
buffer is part of the stage checkpoint (``get_state``): a resumed stage continues the same
responses. Everything here is host-side and deterministic, so every process of a multi-process
job holds the same buffer.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Group:
  """The k samples of one problem in flight."""
  problem: int                  # index into the problem pool
  responses: list               # [k] token ids so far (ending with the stop token if produced)
  done: list                    # [k] bool: ended (stop token produced or M tokens reached)
  iterations: int = 0           # iterations that decoded some of its samples

  @classmethod
  def fresh(cls, problem: int, k: int) -> 'Group':
    return cls(int(problem), [[] for _ in range(k)], [False] * k)

  @property
  def complete(self) -> bool:
    return all(self.done)

  def pending(self) -> list:
    """Sample indices still being decoded."""
    return [j for j, d in enumerate(self.done) if not d]


class RolloutBuffer:
  """Groups with unfinished samples, oldest first."""

  def __init__(self):
    self.groups: list[Group] = []

  def take(self, rows: int) -> list:
    """Removes and returns the oldest groups whose pending samples fit in ``rows`` together (a
    group that does not fit ends the run: later ones wait too, so none waits forever)."""
    taken, used = [], 0
    while self.groups and used + len(self.groups[0].pending()) <= rows:
      group = self.groups.pop(0)
      used += len(group.pending())
      taken.append(group)
    return taken

  def put(self, groups) -> None:
    """Adds the groups that are not complete, after those already waiting."""
    self.groups += [g for g in groups if not g.complete]

  def get_state(self) -> list:
    return [dataclasses.asdict(g) for g in self.groups]

  def set_state(self, state) -> None:
    self.groups = [Group(int(g['problem']), [list(map(int, r)) for r in g['responses']],
                         [bool(d) for d in g['done']], int(g.get('iterations', 0)))
                   for g in (state or [])]


def plan_iteration(buffer: RolloutBuffer, rows: int, k: int, sample_fresh) -> list:
  """The groups one iteration decodes: waiting ones first, then ``sample_fresh(n)`` (pool
  indices of n new problems) as fresh groups in the rows left."""
  carried = buffer.take(rows)
  used = sum(len(g.pending()) for g in carried)
  n_fresh = (rows - used) // k
  fresh = [Group.fresh(i, k) for i in (sample_fresh(n_fresh) if n_fresh > 0 else [])]
  return carried + fresh


def decode_slots(groups) -> list:
  """(group, sample) of every row to decode this iteration, in row order."""
  return [(g, j) for g in groups for j in g.pending()]


def advance(slots, new_tokens: np.ndarray, stop_id: int, max_response: int) -> None:
  """Appends each row's new tokens [rows, B] to its response: up to and including the stop
  token, at most ``max_response`` tokens in all; marks the samples that ended."""
  for (group, j), row in zip(slots, np.asarray(new_tokens)):
    ids = [int(i) for i in row]
    stopped = stop_id in ids
    if stopped:
      ids = ids[:ids.index(stop_id) + 1]
    response = (group.responses[j] + ids)[:max_response]
    group.responses[j] = response
    group.done[j] = (bool(response) and response[-1] == stop_id) or len(response) >= max_response
  for group in {id(g): g for g, _ in slots}.values():
    group.iterations += 1
