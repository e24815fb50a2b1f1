"""Convert any supported source to an ArrayRecord file of common records (images embedded).

  python -m kimi_vl_jax.data.to_arrayrecord --input='data/*.jsonl' --format=auto \
      --output=/tmp/train.array_record [--strict] [--check_images]

Bad records are skipped and counted by reason (first few logged with file:line), or with
--strict the first one stops the run with its file and line. The last line printed is JSON:
``{"written": n, "skipped": {reason: count}, "output": path}``.
"""
from __future__ import annotations

import io
import json
import os

from kimi_vl_jax.data.sources import SourceSpec, open_source
from kimi_vl_jax.data.sources import arrayrecord as ar
from kimi_vl_jax.data.sources.base import BadRecord


def _check_images(record: dict):
  from PIL import Image
  for it in ar._image_items(record):   # pylint: disable=protected-access
    try:
      with Image.open(io.BytesIO(ar.image_bytes(it['image']))) as im:
        im.verify()
    except Exception as e:  # PIL raises many types for corrupt files; all mean "corrupt"
      raise BadRecord('corrupt_image', f'undecodable image ({e.__class__.__name__}: {e})') from None


def convert(input_pattern: str, output: str, fmt: str = 'auto', strict: bool = False,
            check_images: bool = True, name: str = 'converted') -> dict:
  from array_record.python.array_record_module import ArrayRecordWriter
  source = open_source(SourceSpec(name, fmt, input_pattern), strict=strict)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  tmp = output + '.tmp'
  writer = ArrayRecordWriter(tmp, ar.WRITER_OPTIONS)
  written = 0
  try:
    for i in range(len(source)):
      record = source[i]
      try:
        if check_images:
          _check_images(record)
      except BadRecord as bad:
        source.skips.skip(bad, record['origin'])
        continue
      writer.write(ar.encode_record(record))
      written += 1
  finally:
    writer.close()
  os.replace(tmp, output)
  return {'written': written, 'skipped': source.skips.as_dict(), 'output': output}


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  print(json.dumps(convert(f.input, f.output, f.format, f.strict, f.check_images, f.name)))


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_string('input', None, 'glob or comma-separated files', required=True)
  flags.DEFINE_string('output', None, 'the .array_record file to write', required=True)
  flags.DEFINE_string('format', 'auto', 'source format (see kimi_vl_jax.data.sources.formats)')
  flags.DEFINE_string('name', 'converted', 'source name stored in each record')
  flags.DEFINE_bool('strict', False, 'stop at the first bad record')
  flags.DEFINE_bool('check_images', True, 'decode-check every image and skip corrupt ones')
  app.run(main)
