"""train/data.py: the abstract batch of a stage equals what its source yields."""
import jax
import numpy as np
import pytest

from kimi_vl_jax.config import base_config
from kimi_vl_jax.train import data as data_lib, stages as stages_lib


def _config():
  c = base_config('tiny')
  c.train.global_batch = 4
  c.train.seq_len = 64
  c.data.sources = 'text=generated:text@1#text;shapes=generated:shapes@1#mm#qa'
  c.data.max_patches_per_row = 32
  c.data.in_token_limit = 32
  c.stages.vit_pretrain.max_patches_per_row = 16
  return c


@pytest.mark.parametrize('stage_name,task', [('vit_pretrain', None), ('joint_pretrain', None),
                                             ('joint_pretrain', 'lm')])
def test_batch_spec_matches_the_source(stage_name, task):
  c = _config()
  if task:
    c.stages[stage_name].task = task
  stage = stages_lib.resolve(c, stage_name)
  src = data_lib.make_source(c, stage)
  try:
    batch = src.next()
  finally:
    getattr(getattr(src, 'dataset', None), 'close', lambda: None)()
  spec = data_lib.batch_spec(c, stage)
  got = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}
  assert got == spec, (sorted(got.items()), sorted(spec.items()))
