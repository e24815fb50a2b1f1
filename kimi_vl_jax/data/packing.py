"""First-fit packing of tokenized examples into fixed ``[B, S]`` rows plus per-row patch buffers.

Batch (process-local numpy; B rows of S tokens, P patch slots per row)::

  tokens      [B, S] int32   0 ([PAD]) after the last segment
  segment_ids [B, S] int32   1..n per row for the n packed examples, 0 = padding
  positions   [B, S] int32   restart at 0 for every segment (0 on padding)
  loss_mask   [B, S] int32   1 where the token is a training target (the train step shifts)
  source_ids  [B, S] int32   mixture index of the token's source, -1 on padding
  patches, patch_segment_ids, patch_rows, patch_cols, patch_grid_h, patch_grid_w  [B, P, ...]
              ``patch_packing.pack_images`` of the row's images in token order (P > 0 only)

Invariants (tested): no segment crosses a row; the k-th run of ``<|media_pad|>`` in a row has
exactly the k-th image's (h/2)(w/2) tokens, whose patches are slot group k of that row's buffer;
no image is split. An example that fits no open row *waits* and starts the next batch
(``Packer.pending``); a batch is emitted once ``lookahead`` examples wait or every row is full.
An example longer than S is truncated (never inside an image span: the cut moves to before that
image's ``<|media_start|>``) or dropped, by config, and counted.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np

from kimi_vl_jax.data import patch_packing
from kimi_vl_jax.data.examples import Example

TOKEN_FIELDS = ('tokens', 'segment_ids', 'positions', 'loss_mask', 'source_ids')
PATCH_FIELDS = ('patches', 'patch_segment_ids', 'patch_rows', 'patch_cols', 'patch_grid_h',
                'patch_grid_w')


@dataclasses.dataclass(frozen=True)
class PackConfig:
  rows: int                    # B: rows per (process-local) batch
  seq_len: int                 # S: tokens per row
  max_patches: int = 0         # P: patch slots per row (0: text only, no patch arrays)
  overflow: str = 'truncate'   # examples longer than S: truncate | drop
  lookahead: int = 8           # emit the batch once this many examples wait
  patch_dim: int = 588
  merge: tuple[int, int] = (2, 2)

  def __post_init__(self):
    if self.overflow not in ('truncate', 'drop'):
      raise ValueError(f'overflow={self.overflow!r}; expected truncate or drop')
    if self.rows < 1 or self.seq_len < 2 or self.lookahead < 1:
      raise ValueError(f'bad pack config {self}')


@dataclasses.dataclass
class PackStats:
  examples: int = 0
  truncated: int = 0           # examples cut to S tokens
  dropped_too_long: int = 0    # examples longer than S dropped (overflow=drop, or nothing left)
  tokens: int = 0              # non-padding tokens emitted
  slots: int = 0               # token slots emitted (B*S per batch)
  patches: int = 0
  patch_slots: int = 0


def fit_to_length(ex: Example, seq_len: int, media_start_id: int, media_end_id: int,
                  overflow: str) -> Optional[Example]:
  """The example cut to ``seq_len`` tokens without splitting an image, or None if dropped."""
  if ex.num_tokens <= seq_len:
    return ex
  if overflow == 'drop':
    return None
  starts = np.flatnonzero(ex.tokens == media_start_id)
  ends = np.flatnonzero(ex.tokens == media_end_id)
  cut = seq_len
  kept = 0
  for s, e in zip(starts, ends):
    if e < cut:
      kept += 1
    else:
      cut = min(cut, int(s))     # the image would straddle the cut: cut before it
      break
  if cut == 0:
    return None
  return dataclasses.replace(ex, tokens=ex.tokens[:cut], loss_mask=ex.loss_mask[:cut],
                             patches=ex.patches[:kept], grids=ex.grids[:kept])


class _Row:
  def __init__(self):
    self.examples: list[Example] = []
    self.tokens = 0
    self.patches = 0


class Packer:
  """Stateful first-fit packer. ``pending`` (examples waiting for the next batch) is the state
  besides the upstream position; ``next_batch(pull)`` pulls new examples with ``pull()``."""

  def __init__(self, cfg: PackConfig, media_start_id: int, media_end_id: int):
    self.cfg = cfg
    self.media_start_id, self.media_end_id = media_start_id, media_end_id
    self.pending: list[Example] = []
    self.stats = PackStats()

  def _fits(self, row: _Row, ex: Example) -> bool:
    return (row.tokens + ex.num_tokens <= self.cfg.seq_len and
            row.patches + ex.num_patches <= self.cfg.max_patches)

  def next_batch(self, pull: Callable[[], Example]) -> dict:
    """Fills B rows (pending examples first, in order), returns the batch dict."""
    rows = [_Row() for _ in range(self.cfg.rows)]
    queue, self.pending = self.pending, []
    waiting: list[Example] = []
    while len(waiting) < self.cfg.lookahead and any(r.tokens < self.cfg.seq_len for r in rows):
      if queue:
        ex = queue.pop(0)
      else:
        raw = pull()
        ex = fit_to_length(raw, self.cfg.seq_len, self.media_start_id, self.media_end_id,
                           self.cfg.overflow)
        if ex is None:
          self.stats.dropped_too_long += 1
          continue
        self.stats.truncated += ex is not raw
        if ex.num_patches > self.cfg.max_patches:
          raise ValueError(f'{ex.origin}: {ex.num_patches} patches exceed max_patches '
                           f'{self.cfg.max_patches} (limit examples upstream)')
      for row in rows:
        if self._fits(row, ex):
          row.examples.append(ex)
          row.tokens += ex.num_tokens
          row.patches += ex.num_patches
          break
      else:
        waiting.append(ex)
    self.pending = waiting + queue
    return self._emit(rows)

  def _emit(self, rows: list[_Row]) -> dict:
    b, s, p = self.cfg.rows, self.cfg.seq_len, self.cfg.max_patches
    out = {'tokens': np.zeros((b, s), np.int32), 'segment_ids': np.zeros((b, s), np.int32),
           'positions': np.zeros((b, s), np.int32), 'loss_mask': np.zeros((b, s), np.int32),
           'source_ids': np.full((b, s), -1, np.int32)}
    packs = []
    for i, row in enumerate(rows):
      t = 0
      for seg, ex in enumerate(row.examples, start=1):
        n = ex.num_tokens
        out['tokens'][i, t:t + n] = ex.tokens
        out['segment_ids'][i, t:t + n] = seg
        out['positions'][i, t:t + n] = np.arange(n, dtype=np.int32)
        out['loss_mask'][i, t:t + n] = ex.loss_mask
        out['source_ids'][i, t:t + n] = ex.source_id
        t += n
        self.stats.examples += 1
      self.stats.tokens += t
      self.stats.patches += row.patches
      if p:
        images = [(pt, g) for ex in row.examples for pt, g in zip(ex.patches, ex.grids)]
        packs.append(patch_packing.pack_images(images, p, self.cfg.merge, self.cfg.patch_dim))
    self.stats.slots += b * s
    if p:
      stacked = patch_packing.stack_packs(packs)
      out['patches'] = stacked['patches']
      for k in patch_packing.PATCH_FIELDS[1:]:
        out['patch_' + k] = stacked[k]
      self.stats.patch_slots += b * p
    return out
