"""What every source shares: the common record, bad-input accounting, sharded line indexes.

The common record (every source yields it; ``examples.py`` turns it into token ids)::

  {'source': str,                      # source name (the mixture's key)
   'kind': 'chat' | 'document',        # chat: template with turns; document: plain text + [EOS]
   'messages': [{'role', 'content': [items]}],   # kind == 'chat'
   'items': [items],                   # kind == 'document'
   'origin': 'path:line'}              # where it came from, for every error message

Items are ``{'type': 'text', 'text': str}`` or ``{'type': 'image', 'image': ref}`` where
``ref`` is a file path, encoded bytes, a PIL image or a uint8 HWC array.

Bad input never vanishes: each skipped record is counted by reason (``SkipCounter``) and the
first few are logged with ``file:line``; in strict mode the first one raises ``DataError``
naming the file and line.
"""
from __future__ import annotations

import abc
import collections
import glob
import json
import os
from typing import Any, Callable, Iterator, Sequence

from absl import logging

# Every reason a record can be skipped (counters and reports use these names).
REASONS = ('invalid_json', 'non_utf8', 'invalid_record', 'unknown_role', 'empty_conversation',
           'image_count_mismatch', 'missing_image', 'corrupt_image', 'image_beyond_limits',
           'invalid_action', 'invalid_timestamps', 'too_long')


class DataError(ValueError):
  """Strict mode: a bad record; the message starts with ``file:line``."""


class BadRecord(ValueError):
  """A record that must be skipped; ``reason`` is one of REASONS."""

  def __init__(self, reason: str, message: str, origin: str = ''):
    assert reason in REASONS, reason
    super().__init__(message)
    self.reason, self.message, self.origin = reason, message, origin

  def __str__(self):
    return f'{self.origin}: {self.reason}: {self.message}' if self.origin else self.message


class SkipCounter:
  """Counts skipped records by reason; logs the first ``log_first`` with their origin."""

  def __init__(self, strict: bool = False, log_first: int = 5, name: str = 'data'):
    self.strict, self.log_first, self.name = strict, log_first, name
    self.counts: collections.Counter = collections.Counter()
    self.examples: list[str] = []

  def skip(self, bad: BadRecord, origin: str = ''):
    if origin and not bad.origin:
      bad.origin = origin
    if self.strict:
      raise DataError(str(bad)) from bad
    self.counts[bad.reason] += 1
    if len(self.examples) < self.log_first:
      self.examples.append(str(bad))
      logging.warning('%s: skipped %s', self.name, bad)

  def merge(self, other: 'SkipCounter'):
    self.counts.update(other.counts)
    self.examples += other.examples[:max(0, self.log_first - len(self.examples))]

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def as_dict(self) -> dict:
    return dict(sorted(self.counts.items()))


def expand_paths(pattern: str | Sequence[str]) -> list[str]:
  """Sorted files of a glob / comma-separated list (sorted: the same order on every host)."""
  patterns = pattern.split(',') if isinstance(pattern, str) else list(pattern)
  files = []
  for p in patterns:
    p = p.strip()
    if not p:
      continue
    hits = sorted(glob.glob(p)) if any(c in p for c in '*?[') else [p]
    if not hits:
      raise FileNotFoundError(f'no files match {p!r}')
    for f in hits:
      if not os.path.isfile(f):
        raise FileNotFoundError(f'{f!r} does not exist or is not a file')
    files += hits
  if not files:
    raise FileNotFoundError(f'no files given in {pattern!r}')
  return files


def decode_utf8(raw: bytes, origin: str) -> str:
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise BadRecord('non_utf8', f'not UTF-8 at byte {e.start}', origin) from None


def parse_json_line(raw: bytes, origin: str) -> dict:
  text = decode_utf8(raw, origin)
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise BadRecord('invalid_json', f'invalid JSON ({e.msg} at column {e.colno})', origin) from None
  if not isinstance(obj, dict):
    raise BadRecord('invalid_json', f'expected a JSON object, got {type(obj).__name__}', origin)
  return obj


class Source(abc.ABC):
  """A random-access list of common records of one process's shard of some files.

  Subclasses implement ``_scan`` (yield (locator, origin) for every unit of the files, in a
  fixed order) and ``_load(locator, origin) -> record`` (may raise BadRecord). Construction
  keeps the units with ``unit_index % shard_count == shard_index`` and validates each once
  (``_load``); bad ones are counted in ``self.skips`` and left out, so ``__getitem__`` only
  returns records that parsed. Image pixels are checked later, when they are decoded.
  """

  def __init__(self, name: str, paths: str | Sequence[str], *, shard_index: int = 0,
               shard_count: int = 1, strict: bool = False, validate: bool = True):
    if not 0 <= shard_index < shard_count:
      raise ValueError(f'{name}: shard {shard_index} outside [0, {shard_count})')
    self.name = name
    self.files = expand_paths(paths)
    self.skips = SkipCounter(strict=strict, name=name)
    self.units: list[tuple[Any, str]] = []
    for k, (locator, origin) in enumerate(self._scan()):
      if k % shard_count != shard_index:
        continue
      if validate:
        try:
          self._load(locator, origin)
        except BadRecord as bad:
          self.skips.skip(bad, origin)
          continue
      self.units.append((locator, origin))
    if self.skips.total:
      logging.warning('%s: skipped %d bad records at load: %s', name, self.skips.total,
                      self.skips.as_dict())

  @abc.abstractmethod
  def _scan(self) -> Iterator[tuple[Any, str]]:
    """(locator, 'file:line') of every unit, in a fixed order."""

  @abc.abstractmethod
  def _load(self, locator: Any, origin: str) -> dict:
    """The record at ``locator`` (raises BadRecord)."""

  def __len__(self) -> int:
    return len(self.units)

  def __getitem__(self, i: int) -> dict:
    locator, origin = self.units[i]
    record = self._load(locator, origin)
    record['source'] = self.name
    record['origin'] = origin
    return record


class JsonlSource(Source):
  """One JSON object per line; ``parse(obj, origin, base_dir) -> record`` makes the record.

  Relative image paths resolve against the JSONL file's directory.
  """

  def __init__(self, name: str, paths, parse: Callable[[dict, str, str], dict], **kw):
    self._parse = parse
    super().__init__(name, paths, **kw)

  def _scan(self):
    for f in self.files:
      with open(f, 'rb') as fh:
        offset = 0
        for line_no, raw in enumerate(fh, start=1):
          if raw.strip():
            yield (f, offset, len(raw)), f'{f}:{line_no}'
          offset += len(raw)

  def _load(self, locator, origin):
    f, offset, size = locator
    with open(f, 'rb') as fh:
      fh.seek(offset)
      raw = fh.read(size)
    return self._parse(parse_json_line(raw, origin), origin, os.path.dirname(os.path.abspath(f)))


class TextFileSource(Source):
  """Plain ``.txt`` files: documents separated by one or more blank lines."""

  def _scan(self):
    for f in self.files:
      with open(f, 'rb') as fh:
        start, offset, first_line = None, 0, 0
        for line_no, raw in enumerate(fh, start=1):
          if raw.strip():
            if start is None:
              start, first_line = offset, line_no
          elif start is not None:
            yield (f, start, offset - start), f'{f}:{first_line}'
            start = None
          offset += len(raw)
        if start is not None:
          yield (f, start, offset - start), f'{f}:{first_line}'

  def _load(self, locator, origin):
    f, offset, size = locator
    with open(f, 'rb') as fh:
      fh.seek(offset)
      text = decode_utf8(fh.read(size), origin)
    return {'kind': 'document', 'items': [{'type': 'text', 'text': text.rstrip('\n')}]}
