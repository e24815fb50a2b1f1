"""The grain pipeline end to end: exact resume, workers, bad records in the stream, 2 processes."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import importlib

import pytest

from kimi_vl_jax.config import base
from kimi_vl_jax.data import config_check, pipeline
from kimi_vl_jax.data.sources import DataError

validate = importlib.import_module('kimi_vl_jax.config.validate')
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _pipeline_data import small_config, write_dataset  # noqa: E402


def _build(tok, cfg, **kw):
  return pipeline.build_dataset(cfg, tokenizer=tok, process_index=0, process_count=1, **kw)


def _eq(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batches_and_exact_resume(tok, tmp_path):
  cfg = small_config(write_dataset(str(tmp_path)))
  config_check.check_data(cfg)
  it = iter(_build(tok, cfg))
  first = [next(it) for _ in range(6)]
  b = first[0]
  assert b['tokens'].shape == (4, 128) and b['patches'].shape == (4, 64, 588)
  assert set(np.unique(b['source_ids'])) <= {-1, 0, 1}
  # Resume from the state after 2 batches (JSON round trip, as a checkpoint would store it).
  it = iter(_build(tok, cfg))
  for _ in range(2):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert state['pending'], 'the test should exercise waiting examples'
  resumed = iter(_build(tok, cfg))
  resumed.set_state(state)
  for want in first[2:]:
    _eq(next(resumed), want)
  straight = iter(_build(tok, cfg))
  for _ in range(6):
    next(straight)
  assert resumed.get_state() == straight.get_state()
  report = resumed.report()
  assert set(report['mix']) == {'docs', 'vqa'} and report['skipped'] == {}
  assert 0.3 < report['mix']['vqa']['example_share'] < 0.7
  # Same seed -> same batches; another seed -> different ones.
  cfg.data.seed = 1
  assert not np.array_equal(next(iter(_build(tok, cfg)))['tokens'], first[0]['tokens'])


def test_worker_processes_give_the_same_batches(tok, tmp_path):
  cfg = small_config(write_dataset(str(tmp_path)), workers=2, worker_buffer=2)
  want = []
  it = iter(_build(tok, cfg, workers=0))
  want = [next(it) for _ in range(4)]
  it = iter(_build(tok, cfg))
  got = [next(it), next(it)]
  state = it.get_state()
  it.close()
  for g, w in zip(got, want):
    _eq(g, w)
  resumed = iter(_build(tok, cfg))
  resumed.set_state(state)
  for w in want[2:]:
    _eq(next(resumed), w)
  resumed.close()


def test_bad_records_in_the_stream(tok, tmp_path):
  spec = write_dataset(str(tmp_path), corrupt=True)
  cfg = small_config(spec.split(';')[1])   # only the VQA source (with the corrupt image)
  it = iter(_build(tok, cfg))
  for _ in range(8):
    next(it)
  assert it.skips.counts['corrupt_image'] > 0
  assert 'vqa.jsonl:25' in it.skips.examples[0] and 'broken.png' in it.skips.examples[0]
  assert it.report()['skipped'] == {'corrupt_image': it.skips.counts['corrupt_image']}
  cfg.data.strict = True
  it = iter(_build(tok, cfg))
  with pytest.raises(DataError, match=r'vqa.jsonl:25: corrupt_image'):
    for _ in range(8):
      next(it)


def test_config_checks():
  assert config_check.check_data in validate._EXTRA_CHECKS   # validate() runs it
  config_check.check_data(small_config('a=text:x.txt'))
  config_check.check_data(base.base_config('small'))          # the default generated mix
  cfg = small_config('a=text:x.txt', overflow='wrap')
  with pytest.raises(validate.ConfigError, match='config.data.overflow'):
    config_check.check_data(cfg)
  cfg = small_config('a=text:x.txt', max_patches_per_row=30)
  with pytest.raises(validate.ConfigError, match='config.data.max_patches_per_row'):
    config_check.check_data(cfg)
  with pytest.raises(validate.ConfigError, match='config.data.sources'):
    config_check.check_data(small_config('a=bogus:x'))


@pytest.mark.slow
def test_two_processes_read_their_own_shards(tmp_path):
  write_dataset(str(tmp_path / 'data'))
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), '_two_process_worker.py')
  procs = []
  for p in range(2):
    env = dict(os.environ, KVJ_COORDINATOR=f'localhost:{port}', KVJ_NUM_PROCESSES='2',
               KVJ_PROCESS_ID=str(p), XLA_FLAGS='--xla_force_host_platform_device_count=1',
               JAX_PLATFORMS='cpu')
    procs.append(subprocess.Popen([sys.executable, worker, str(tmp_path / f'out{p}.json'),
                                   str(tmp_path / 'data')], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  for p in procs:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
  res = [json.load(open(tmp_path / f'out{p}.json')) for p in range(2)]
  for p, r in enumerate(res):
    assert r['process'] == p and r['count'] == 2 and r['local_rows'] == 2
    assert r['global_shapes'] == [[4, 128]] * 3
    assert all(d % 2 == p for d in r['docs']), 'each process reads only its shard'
    assert all(int(u.rsplit(':', 1)[1]) % 4 in ((1,) if p == 0 else (3,)) for u in r['units'])
  assert not set(res[0]['units']) & set(res[1]['units'])
  assert res[0]['docs'] and res[1]['docs']


def test_generated_sources_and_unexpected_errors_name_the_record(tok, tmp_path):
  cfg = small_config('shapes=generated:shapes?max_side=112@1;text=generated:text@1#text')
  batch = next(iter(_build(tok, cfg)))
  assert (batch['patch_segment_ids'] > 0).any() and (batch['segment_ids'] > 0).any()
  ds = _build(tok, cfg)
  ds.stream.sources[0].dataset = None          # simulate a bug inside a source
  with pytest.raises(RuntimeError, match=r'shapes\[\d+\] \(stream example \d+\)'):
    for _ in range(4):
      next(iter(ds))


def test_schedule_clock_estimate(tok, tmp_path):
  cfg = small_config(write_dataset(str(tmp_path)))
  ds = _build(tok, cfg)
  eps = ds.stream.examples_per_step
  # 4 rows of 128 tokens hold several of these short examples; the estimate says how many.
  assert 4 < eps < 4 * 128 // 10
  it = iter(ds)
  batches = [next(it) for _ in range(20)]
  real = sum(int(((b['positions'] == 0) & (b['segment_ids'] > 0)).sum()) for b in batches) / 20
  assert abs(real - eps) / real < 0.35, (real, eps)
  cfg.data.examples_per_step = 3
  assert _build(tok, cfg).stream.examples_per_step == 3
