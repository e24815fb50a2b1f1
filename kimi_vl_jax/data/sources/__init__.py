"""Sources: files (or generated datasets) -> random-access lists of common records.

``open_source(spec, shard_index, shard_count, strict)`` builds the source of one mixture
entry for one process's shard (see ``base.py`` for the record, ``formats.py`` for formats).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from kimi_vl_jax.data.sources.arrayrecord import ArrayRecordSource
from kimi_vl_jax.data.sources.base import (REASONS, BadRecord, DataError, JsonlSource, SkipCounter,
                                           Source, TextFileSource, expand_paths)
from kimi_vl_jax.data.sources.formats import FORMATS, PARSERS


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One entry of a mixture: ``name=format:path@weight#tag#tag``.

  format: one of ``formats.FORMATS``; ``generated`` takes a dataset name as path.
  tags: what the schedules act on: ``text`` / ``mm`` (modality), ``long`` / ``short``,
  ``qa``. A source without a modality tag counts as ``text`` for ``text`` and ``generated``
  text sets, else ``mm``.
  """
  name: str
  format: str
  path: str
  weight: float = 1.0
  tags: tuple[str, ...] = ()


class GeneratedSource:
  """Adapter for the generated datasets (``ds[i]`` pure in (split, seed, i)); shard by stride."""

  def __init__(self, name: str, dataset: Any, shard_index: int = 0, shard_count: int = 1):
    self.name, self.dataset = name, dataset
    self.shard_index, self.shard_count = shard_index, shard_count
    self.skips = SkipCounter(name=name)

  def __len__(self) -> int:
    return len(self.dataset) // self.shard_count

  def __getitem__(self, i: int) -> dict:
    k = int(i) * self.shard_count + self.shard_index
    rec = dict(self.dataset[k])
    origin = f'{self.name}[{k}]'
    if rec.get('kind') in ('chat', 'document'):
      out = {k: rec[k] for k in ('kind', 'messages', 'items') if k in rec}
    elif 'messages' in rec:
      out = {'kind': 'chat', 'messages': rec['messages']}
    elif 'items' in rec:
      out = {'kind': 'document', 'items': rec['items']}
    elif 'text' in rec:
      out = {'kind': 'document', 'items': [{'type': 'text', 'text': rec['text']}]}
    else:
      raise BadRecord('invalid_record', f'generated record without messages/items/text: '
                      f'{sorted(rec)}', origin)
    out.update(source=self.name, origin=origin)
    return out


def parse_generated_path(path: str) -> tuple[str, dict]:
  """``<name>`` or ``<name>?key=value&...`` -> (generated dataset name, its keyword args)."""
  from kimi_vl_jax.data import generated  # imported lazily: only specs that use it pay for it
  name, _, query = path.partition('?')
  kwargs = {}
  for kv in filter(None, query.split('&')):
    k, _, v = kv.partition('=')
    kwargs[k] = int(v) if v.lstrip('-').isdigit() else v
  if name not in generated.DATASETS:
    raise ValueError(f'unknown generated dataset {name!r}; known: {", ".join(generated.DATASETS)}')
  return name, kwargs


def _generated_factory(path: str) -> Callable[..., Any]:
  """``path`` names a generated dataset: ``<name>`` or ``<name>?key=value&...``."""
  from kimi_vl_jax.data import generated
  name, kwargs = parse_generated_path(path)
  return lambda split, seed: generated.get_dataset(name, split=split, seed=seed, **kwargs)


def open_source(spec: SourceSpec, shard_index: int = 0, shard_count: int = 1,
                strict: bool = False, split: str = 'train', seed: int = 0):
  """The source of ``spec`` restricted to one shard (each process reads only its shard)."""
  kw = dict(shard_index=shard_index, shard_count=shard_count, strict=strict)
  if spec.format == 'generated':
    return GeneratedSource(spec.name, _generated_factory(spec.path)(split, seed),
                           shard_index, shard_count)
  if spec.format == 'arrayrecord':
    return ArrayRecordSource(spec.name, spec.path, **kw)
  if spec.format == 'text' and all(f.endswith('.txt') for f in expand_paths(spec.path)):
    return TextFileSource(spec.name, spec.path, **kw)
  if spec.format not in PARSERS:
    raise ValueError(f'source {spec.name!r}: unknown format {spec.format!r}; one of {FORMATS}')
  return JsonlSource(spec.name, spec.path, PARSERS[spec.format], **kw)


__all__ = ['REASONS', 'BadRecord', 'DataError', 'SkipCounter', 'Source', 'SourceSpec',
           'GeneratedSource', 'open_source', 'parse_generated_path', 'FORMATS']
