"""bench.data counts what the pipeline produced (pipeline half only: the train half compiles)."""
import os
import sys

from absl import flags

from kimi_vl_jax.bench import data as bench_data

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'data'))
from _pipeline_data import write_dataset  # noqa: E402


def test_measure_pipeline(tmp_path):
  spec = write_dataset(str(tmp_path))
  flags.FLAGS(['bench', f'--sources={spec}', '--workers=0', '--batches=3', '--warmup=1',
               '--seq_len=128', '--global_batch=4'])
  try:
    cfg = bench_data._config()
    cfg.data.max_patches_per_row = 64
    cfg.data.in_token_limit = 64
    rates, batch = bench_data.measure_pipeline(cfg)
  finally:
    flags.FLAGS.unparse_flags()
  assert batch['tokens'].shape == (4, 128)
  assert rates['examples_per_s'] > 0 and rates['patches_per_s'] > 0
  assert rates['examples_per_batch'] >= 4
  assert set(rates['report']['mix']) == {'docs', 'vqa'}
