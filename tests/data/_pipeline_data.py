"""Files for the pipeline tests (written into a temp dir) and a small config over them."""
import json
import os

from PIL import Image

from kimi_vl_jax.config import base


def write_dataset(root: str, n_docs: int = 40, n_vqa: int = 24, corrupt: bool = False) -> str:
  """Writes a text file of numbered documents and a VQA JSONL; returns the data.sources spec."""
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, 'docs.txt'), 'w') as f:
    for i in range(n_docs):
      f.write(f'doc {i} ' + 'the red circle is above the blue square. ' * (1 + i % 5) + '\n\n')
  rows = []
  for i in range(n_vqa):
    name = f'im{i}.png'
    Image.new('RGB', (28 + 14 * (i % 4), 28 + 14 * (i % 3)), (i * 10 % 255, 80, 160)).save(
        os.path.join(root, name))
    rows.append({'messages': [{'role': 'user', 'content': f'<image>Which color? q{i}'},
                              {'role': 'assistant', 'content': f'blue {i}'}], 'images': [name]})
  if corrupt:
    with open(os.path.join(root, 'broken.png'), 'wb') as f:
      f.write(b'\x89PNG\r\n\x1a\n garbage')
    rows.append({'messages': [{'role': 'user', 'content': '<image>?'},
                              {'role': 'assistant', 'content': 'x'}], 'images': ['broken.png']})
  with open(os.path.join(root, 'vqa.jsonl'), 'w') as f:
    for r in rows:
      f.write(json.dumps(r) + '\n')
  return (f'docs=text:{os.path.join(root, "docs.txt")}@1;'
          f'vqa=messages:{os.path.join(root, "vqa.jsonl")}@1')


def small_config(sources: str, **data):
  c = base.base_config('small')
  c.data.sources = sources
  c.train.seq_len = 128
  c.train.global_batch = 4
  c.data.max_patches_per_row = 64
  c.data.in_token_limit = 64
  c.data.pack_lookahead = 4
  for k, v in data.items():
    c.data[k] = v
  return c
