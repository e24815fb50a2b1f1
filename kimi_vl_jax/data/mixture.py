"""Per-stage mixtures over sources and their schedules, deterministic from (seed, step).

Sources are written ``name=format:path@weight#tag#tag`` and separated by ``;`` (``parse_sources``).
Tags: ``text`` / ``mm`` (modality; default ``text`` for the text format, else ``mm``),
``long`` (long-context data), ``qa`` (synthetic QA). Schedules come from the stage block
(``config.stages.<name>``, see ``Mixture``): text-only warm-up then a multimodal share rising
linearly (joint pretraining), 25% long / 75% short (long-context stages), and
``config.data.qa_share_cap`` (cooldown: QA at most 10%).

Which record is example ``i`` of process ``p`` is a pure function of (seed, p, i)
(``stream_plan.StreamPlan``: stratified blocks with the weights of step ``i // examples_per_step``,
every record of a source once per epoch). ``mix_report`` gives the realized mix next to the weights.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from kimi_vl_jax.data.sources import FORMATS, SourceSpec, parse_generated_path


def parse_sources(spec: str) -> list[SourceSpec]:
  """'a=text:/x/*.txt@3#text;b=generated:shapes@1#qa' -> [SourceSpec, ...]."""
  out = []
  for entry in filter(None, (e.strip() for e in spec.split(';'))):
    name, eq, rest = entry.partition('=')
    fmt, colon, rest = rest.partition(':')
    if not eq or not colon or not name:
      raise ValueError(f'data.sources entry {entry!r}: expected name=format:path[@weight][#tag]')
    if fmt not in FORMATS:
      raise ValueError(f'data.sources entry {entry!r}: unknown format {fmt!r}; one of {FORMATS}')
    path, *tags = rest.split('#')
    weight = 1.0
    if '@' in path:
      path, w = path.rsplit('@', 1)
      try:
        weight = float(w)
      except ValueError:
        raise ValueError(f'data.sources entry {entry!r}: weight {w!r} is not a number') from None
    if not weight >= 0:
      raise ValueError(f'data.sources entry {entry!r}: weight must be >= 0')
    bad = [t for t in tags if t not in ('text', 'mm', 'long', 'short', 'qa')]
    if bad:
      raise ValueError(f'data.sources entry {entry!r}: unknown tags {bad}')
    if 'text' not in tags and 'mm' not in tags:
      tags.append('text' if fmt == 'text' else 'mm')
    out.append(SourceSpec(name, fmt, path, weight, tuple(tags)))
  names = [s.name for s in out]
  if len(set(names)) != len(names):
    raise ValueError(f'data.sources: duplicate source names in {names}')
  if not out:
    raise ValueError('data.sources is empty')
  if sum(s.weight for s in out) <= 0:
    raise ValueError('data.sources: all weights are 0')
  return out


def generated_views(spec: str) -> dict[str, tuple[str, dict]]:
  """The ``generated`` entries of a data.sources string: {name: (dataset, keyword args)}."""
  return {s.name: parse_generated_path(s.path) for s in parse_sources(spec)
          if s.format == 'generated'}


def _set_share(w: np.ndarray, group: np.ndarray, share: float) -> np.ndarray:
  """Rescales ``w`` so the ``group`` sources hold ``share`` of the total (others 1 - share)."""
  inside, outside = w[group].sum(), w[~group].sum()
  if inside <= 0 or outside <= 0:
    return w
  out = w.copy()
  out[group] *= share / inside
  out[~group] *= (1.0 - share) / outside
  return out


@dataclasses.dataclass(frozen=True)
class Mixture:
  """Source weights over one stage. Steps are counted from the stage start.

  stage_steps: the stage's length (the fractions below are of it; 0 = unknown: the
    multimodal share sits at its end value after the text-only part).
  text_only_fraction: the first fraction of the stage draws only ``text`` sources.
  mm_share_start/end: the ``mm`` share rises linearly from start (right after the text-only
    part) to end (at the stage end). Both 1.0 (the stage schema's default) = leave the
    weights as they are.
  long_share: share of ``long`` sources (long-context stages: 0.25); 0 = off.
  qa_share_cap: at most this share for ``qa`` sources (cooldown: 0.1); < 0 = off.
  """
  sources: tuple[SourceSpec, ...]
  stage_steps: int = 0
  text_only_fraction: float = 0.0
  mm_share_start: float = 1.0
  mm_share_end: float = 1.0
  long_share: float = 0.0
  qa_share_cap: float = -1.0

  @classmethod
  def for_stage(cls, sources: Sequence[SourceSpec], stage=None, stage_steps: int = 0,
                qa_share_cap: float = -1.0) -> 'Mixture':
    """From a ``config.stages.<name>`` block (its ``mixture`` 'name=weight,...' overrides the
    sources' weights; sources it does not name get 0)."""
    sources = list(sources)
    if stage is None:
      return cls(tuple(sources), stage_steps, qa_share_cap=qa_share_cap)
    if stage.mixture:
      names = {s.name for s in sources}
      override = {}
      for entry in filter(None, (e.strip() for e in stage.mixture.split(','))):
        name, _, w = entry.partition('=')
        if name not in names:
          raise ValueError(f'stage mixture {stage.mixture!r}: unknown source {name!r}; '
                           f'sources are {sorted(names)}')
        override[name] = float(w)
      sources = [dataclasses.replace(s, weight=override.get(s.name, 0.0)) for s in sources]
    return cls(tuple(sources), stage_steps, float(stage.text_only_fraction),
               float(stage.multimodal_share_start), float(stage.multimodal_share_end),
               float(stage.long_fraction), qa_share_cap)

  @property
  def names(self) -> list[str]:
    return [s.name for s in self.sources]

  def _group(self, tag: str) -> np.ndarray:
    return np.array([tag in s.tags for s in self.sources])

  def weights(self, step: int) -> np.ndarray:
    """Normalized source weights [K] at ``step`` of the stage."""
    w = np.array([s.weight for s in self.sources], np.float64)
    if w.sum() <= 0:
      raise ValueError(f'every source weight is 0: {self.names}')
    w /= w.sum()
    mm = self._group('mm')
    warm = self.text_only_fraction * self.stage_steps
    if step < warm and (~mm).any() and w[~mm].sum() > 0:
      w = np.where(mm, 0.0, w)
    elif (self.mm_share_start, self.mm_share_end) != (1.0, 1.0):
      span = self.stage_steps - warm
      t = np.clip((step - warm) / span, 0.0, 1.0) if span > 0 else 1.0
      w = _set_share(w, mm, self.mm_share_start + t * (self.mm_share_end - self.mm_share_start))
    if self.long_share > 0:
      w = _set_share(w, self._group('long'), self.long_share)
    if self.qa_share_cap >= 0:
      qa = self._group('qa')
      if w[qa].sum() > self.qa_share_cap:
        w = _set_share(w, qa, self.qa_share_cap)
    return w / w.sum()


def mix_report(names: Sequence[str], examples: Sequence[int], tokens: Sequence[int],
               weights: Sequence[float]) -> dict:
  """Realized mix per source: example and token shares next to the configured weight."""
  ex_total, tok_total = float(max(1, int(sum(examples)))), float(max(1, int(sum(tokens))))
  return {n: {'weight': round(float(w), 4), 'examples': int(e),
              'example_share': round(float(e) / ex_total, 4),
              'token_share': round(float(t) / tok_total, 4)}
          for n, e, t, w in zip(names, examples, tokens, weights)}
