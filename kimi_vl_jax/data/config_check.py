"""Checks of ``config.data`` (registered with ``config.validate``; one-line errors naming the key)."""
from __future__ import annotations

from kimi_vl_jax.config import validate as v


@v.register_check
def check_data(cfg, num_devices=None):
  del num_devices
  if 'data' not in cfg:
    return
  d = cfg.data
  v._one_of(cfg, 'data.overflow', ('truncate', 'drop'))         # pylint: disable=protected-access
  v._one_of(cfg, 'data.split', ('train', 'eval'))               # pylint: disable=protected-access
  for k in ('workers', 'worker_buffer', 'max_patches_per_row', 'examples_per_step', 'seed'):
    v._positive_int(cfg, f'data.{k}', allow_zero=True)          # pylint: disable=protected-access
  for k in ('in_token_limit', 'max_images_per_example', 'pack_lookahead', 'read_threads'):
    v._positive_int(cfg, f'data.{k}')                           # pylint: disable=protected-access
  if d.max_patches_per_row % 4:
    v._fail('data.max_patches_per_row',                         # pylint: disable=protected-access
            f'{d.max_patches_per_row} must be a multiple of 4 (2x2 merge blocks)')
  if d.qa_share_cap > 1:
    v._fail('data.qa_share_cap', f'must be <= 1, got {d.qa_share_cap}')  # pylint: disable=protected-access
  if d.sources:
    from kimi_vl_jax.data import mixture
    try:
      mixture.parse_sources(d.sources)
    except ValueError as e:
      v._fail('data.sources', str(e))                           # pylint: disable=protected-access
