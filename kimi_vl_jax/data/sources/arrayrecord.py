"""ArrayRecord files of common records (grain's random-access format), images embedded.

One ArrayRecord entry = ``MAGIC`` + 8-byte little-endian header length + UTF-8 JSON header
(the record with each image item's ``image`` replaced by ``{"blob": k}``, plus
``"blob_sizes"``) + the image blobs (encoded file bytes) back to back. Written with
``group_size:1`` so every entry is one seek away.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
from PIL import Image

from kimi_vl_jax.data.sources.base import BadRecord, Source

MAGIC = b'KVJREC1\n'
WRITER_OPTIONS = 'group_size:1'


def _image_items(record: dict) -> list[dict]:
  if record['kind'] == 'document':
    return [it for it in record['items'] if it['type'] == 'image']
  return [it for m in record['messages'] for it in m['content'] if it['type'] == 'image']


def image_bytes(ref: Any) -> bytes:
  """Encoded bytes of an image ref: a file's bytes as they are; PIL / arrays as PNG."""
  if isinstance(ref, (bytes, bytearray)):
    return bytes(ref)
  if isinstance(ref, (str, os.PathLike)):
    with open(ref, 'rb') as f:
      return f.read()
  if isinstance(ref, np.ndarray):
    ref = Image.fromarray(ref)
  if isinstance(ref, Image.Image):
    buf = io.BytesIO()
    ref.save(buf, format='PNG')
    return buf.getvalue()
  raise TypeError(f'cannot serialize an image of type {type(ref).__name__}')


def encode_record(record: dict) -> bytes:
  """Common record -> one ArrayRecord entry (images read and embedded)."""
  blobs = []

  def strip(items):
    out = []
    for it in items:
      if it['type'] == 'image':
        out.append({'type': 'image', 'image': {'blob': len(blobs)}})
        blobs.append(image_bytes(it['image']))
      else:
        out.append({'type': 'text', 'text': it['text']})
    return out

  header = {k: record[k] for k in ('kind', 'source', 'origin') if k in record}
  if record['kind'] == 'document':
    header['items'] = strip(record['items'])
  else:
    header['messages'] = [{'role': m['role'], 'content': strip(m['content'])}
                          for m in record['messages']]
  header['blob_sizes'] = [len(b) for b in blobs]
  head = json.dumps(header, ensure_ascii=False).encode('utf-8')
  return MAGIC + len(head).to_bytes(8, 'little') + head + b''.join(blobs)


def decode_record(raw: bytes, origin: str) -> dict:
  """One entry -> common record whose image refs are encoded bytes."""
  if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + 8:
    raise BadRecord('invalid_record', 'not a kimi_vl_jax record (bad magic)', origin)
  n = int.from_bytes(raw[len(MAGIC):len(MAGIC) + 8], 'little')
  start = len(MAGIC) + 8
  try:
    header = json.loads(raw[start:start + n].decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise BadRecord('invalid_json', f'corrupt record header ({e})', origin) from None
  offset = start + n
  blobs = []
  for size in header.pop('blob_sizes', []):
    blobs.append(raw[offset:offset + size])
    offset += size
  if offset != len(raw):
    raise BadRecord('invalid_record', f'record length {len(raw)} != {offset} described', origin)
  for it in _image_items(header):
    it['image'] = blobs[it['image']['blob']]
  return header


class ArrayRecordSource(Source):
  """Entries of ``.array_record`` files written by ``to_arrayrecord``; origin ``file:entry``."""

  def __init__(self, name, paths, **kw):
    self._readers = {}
    super().__init__(name, paths, **kw)

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_readers'] = {}       # readers hold file handles; reopened lazily in each worker
    return state

  def _reader(self, f):
    if f not in self._readers:
      from array_record.python.array_record_module import ArrayRecordReader
      self._readers[f] = ArrayRecordReader(f, 'readahead_buffer_size:0')
    return self._readers[f]

  def _scan(self):
    for f in self.files:
      for k in range(self._reader(f).num_records()):
        yield (f, k), f'{f}:{k}'

  def _load(self, locator, origin):
    f, k = locator
    record = decode_record(self._reader(f).read([k])[0], origin)
    if record.get('kind') not in ('chat', 'document'):
      raise BadRecord('invalid_record', f'unknown kind {record.get("kind")!r}', origin)
    return record
