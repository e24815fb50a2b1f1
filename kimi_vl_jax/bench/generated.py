"""Generation rate of every generated dataset, in one process on one core.

``python -m kimi_vl_jax.bench.generated [--n 300] [--difficulty 0]`` times ``ds[i]`` for
i = 1..n (index 0 warms the font caches) for the train and eval splits at the default image
sizes (56..224 px) and prints examples/s of CPU time (``time.process_time``: the work this
process did, so other load on the machine does not count) and of wall time. The target for
the image sets is >= 200 examples/s per core. The last printed line is a JSON object:
``{"<name>/<split>": {"cpu_examples_per_s": .., "wall_examples_per_s": ..,
"mean_image_tokens": ..}, "min_image_set_cpu_examples_per_s": ..}``.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from kimi_vl_jax.data import generated

IMAGE_SETS = ('shapes', 'ocr', 'charts', 'gui', 'video', 'interleaved')


def _image_tokens(record) -> int:
  """LM tokens of the record's images: (ceil(H/28)) * (ceil(W/28)) each (pad to 28, merge 2x2)."""
  items = record['items'] if record['kind'] == 'document' else [
      it for m in record['messages'] for it in m['content']]
  total = 0
  for it in items:
    if it['type'] == 'image':
      h, w = np.asarray(it['image']).shape[:2]
      total += math.ceil(h / 28) * math.ceil(w / 28)
  return total


def measure(name: str, split: str, n: int, difficulty: int) -> dict:
  ds = generated.get_dataset(name, split, 0, difficulty=difficulty)
  ds[0]
  c0, w0 = time.process_time(), time.perf_counter()
  records = [ds[i] for i in range(1, n + 1)]
  cpu, wall = time.process_time() - c0, time.perf_counter() - w0
  return {'cpu_examples_per_s': round(n / cpu, 1), 'wall_examples_per_s': round(n / wall, 1),
          'mean_image_tokens': round(float(np.mean([_image_tokens(r) for r in records])), 1)}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--n', type=int, default=300)
  p.add_argument('--difficulty', type=int, default=0, choices=(0, 1, 2))
  args = p.parse_args(argv)
  out = {}
  print(f'{"dataset/split":24s} {"cpu ex/s":>10s} {"wall ex/s":>10s} {"img tokens":>10s}')
  for name in generated.DATASETS:
    for split in generated.SPLITS:
      r = measure(name, split, args.n, args.difficulty)
      out[f'{name}/{split}'] = r
      print(f'{name + "/" + split:24s} {r["cpu_examples_per_s"]:10.0f} '
            f'{r["wall_examples_per_s"]:10.0f} {r["mean_image_tokens"]:10.1f}')
  out['min_image_set_cpu_examples_per_s'] = min(
      out[f'{n}/{s}']['cpu_examples_per_s'] for n in IMAGE_SETS for s in generated.SPLITS)
  print(json.dumps(out))
  return out


if __name__ == '__main__':
  main()
