"""Eval sets: held-out generated data drawn at the experiment's image size."""
import pytest

from kimi_vl_jax.config import base_config
from kimi_vl_jax.data.generated import is_correct
from kimi_vl_jax.train import evaluate


def _images(record):
  return [it['image'] for m in record['messages'] if isinstance(m['content'], list)
          for it in m['content'] if it['type'] == 'image']


@pytest.mark.parametrize('side', [56, 112])
def test_eval_images_follow_train_image_max_side(side):
  c = base_config('tiny')
  c.train.image_max_side = side
  for name in ('vqa', 'counting', 'ocr'):
    ds_name, tasks = evaluate.EXACT_MATCH_SETS[name]
    ds = evaluate.eval_dataset(c, ds_name, tasks, seq_len=128)
    records = [ds[i] for i in range(8)]
    assert all(r['task'] in tasks for r in records)
    sizes = [im.size for r in records for im in _images(r)]
    assert sizes and max(max(s) for s in sizes) <= side, (name, sizes)
    assert all(is_correct(r, r['answer']) for r in records)


def test_needle_haystack_fills_a_third_of_the_row():
  c = base_config('tiny')
  short = evaluate.eval_dataset(c, 'needle', ('needle',), seq_len=300)
  long = evaluate.eval_dataset(c, 'needle', ('needle',), seq_len=3000)
  assert short.length == 100 and long.length == 1000
