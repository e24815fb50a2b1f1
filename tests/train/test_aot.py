"""train/aot.py: the trainer's step compiled ahead of time for a TPU topology, on this host.

libtpu compiles for TPU on any machine (``make test`` installs it with the ``aot`` extra). The
tiny Kimi-VL recipe on a 4-chip v5p slice exercises what only a TPU program has: splash
attention per device in shard_map, the ragged MoE backend, expert-parallel all-to-all.
"""
import importlib.util

import pytest

from kimi_vl_jax.config import base_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                       reason="needs libtpu: pip install -e '.[aot]' (make test installs it)"),
]

TOPOLOGY = 'v5p:2x2x1'   # 4 chips, one host


def _config(**train):
  c = base_config('tiny')
  c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.tensor = 1, 2, 2, 1
  c.train.global_batch = 8
  c.train.seq_len = 256
  c.data.max_patches_per_row = 256
  for name in c.stages:
    c.stages[name].steps = 4
  for k, v in train.items():
    c.train[k] = v
  return c


@pytest.fixture(scope='module')
def devices():
  from kimi_vl_jax.train import aot
  return aot.topology_devices(TOPOLOGY)


def test_kimi_vl_step_compiles_for_tpu_with_tpu_kernels(devices):
  from kimi_vl_jax.train import aot
  r = aot.compile_stage(_config(), 'joint_pretrain', devices, keep_text=True)
  assert r['fits'], r.get('error')
  assert r['devices'] == 4 and 'TPU' in r['device_kind']
  assert r['mesh'] == {'data': 1, 'fsdp': 2, 'expert': 2, 'tensor': 1}
  assert 0 < r['argument_gib'] < 1 and 0 < r['total_gib'] < 95
  text = r['lowered']
  assert 'tpu_custom_call' in text          # splash (Mosaic), per device in shard_map
  assert 'all_to_all' in text               # expert parallelism over 'expert'
  assert 'ragged_dot' in text               # the accelerator MoE backend, chosen by 'auto'


def test_a_step_beyond_hbm_is_reported_not_raised(devices):
  from kimi_vl_jax.train import aot
  c = _config(global_batch=4096, seq_len=8192)
  c.stages.joint_pretrain.task = 'lm'
  r = aot.compile_stage(c, 'joint_pretrain', devices)
  assert not r['fits']
  assert 'RESOURCE_EXHAUSTED' in r['error'] and 'HBM' in r['error']
  assert 'DOES NOT FIT' in aot.describe_result(r)


def test_rl_stage_compiles_its_train_step_sampler_and_reference_programs(devices, tmp_path):
  """The rl stage's three programs at their largest shapes: the train step on training rows
  with the RL keys, the KV-cache sampler over every row of an iteration, and the reference
  log-probabilities; each with its own memory figures. None of them goes into a persistent
  compilation cache that is set (a topology's executables cannot be loaded back)."""
  import jax
  from kimi_vl_jax.train import aot, loop
  c = _config()
  c.stages.rl.global_batch = 8
  c.rl.model = 'lm'
  cache = tmp_path / 'cache'
  with loop.compilation_cache(str(cache), ''):
    r = aot.compile_rl_stage(c, 'rl', devices, keep_text=True)
    assert jax.config.jax_compilation_cache_dir == str(cache)   # restored after the compiles
  assert not cache.exists() or not any(cache.iterdir())
  assert r['fits'] and r['decode']['fits'] and r['ref_logp']['fits'], aot.describe_result(r)
  assert (r['global_batch'], r['seq_len']) == (8, 256)
  for f in (r, r['decode'], r['ref_logp']):
    assert 0 < f['total_gib'] < 95
  text = r['lowered']
  assert 'all_to_all' in text['train'] and 'ragged_dot' in text['train']
  assert 'stablehlo.while' in text['decode']   # one single-token LM step per new token
  line = aot.describe_result(r)
  assert 'train step fits' in line and 'decode fits' in line and 'ref_logp fits' in line


def test_cli_compiles_the_demo_recipe_for_a_topology(tmp_path):
  # --mode=aot end to end: the config is validated against the topology's chips, each stage
  # is compiled, one line per stage is printed and the figures land in <workdir>/aot.json.
  import json
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = {k: v for k, v in os.environ.items() if not k.startswith(('KVJ_', 'SLURM_'))}
  env.update(JAX_PLATFORMS='cpu')
  run = lambda *a: subprocess.run([sys.executable, '-m', 'kimi_vl_jax.main', *a], cwd=repo,
                                  env=env, capture_output=True, text=True, timeout=600)
  base = ['--config=experiments/demo.py', '--mode=aot', f'--workdir={tmp_path}']
  mesh = ['--config.mesh.data=1', '--config.mesh.fsdp=2', '--config.mesh.expert=2',
          '--config.stages.long_context_2.global_batch=4']   # the demo's 2 rows: 1 per chip
  # The layer stacks as one rolled loop (scan_unroll=1, the A3B recipe's setting): the same
  # program per layer, compiled in ~27 s here vs ~43 s for the demo's straight-line layers.
  rolled = ['--config.model.lm.scan_unroll=1', '--config.model.vision.scan_unroll=1']
  r = run(*base, *mesh, *rolled, f'--topology={TOPOLOGY}', '--stages=sft_1')
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'sft_1: 4 x TPU' in r.stdout and 'fits, per device' in r.stdout, r.stdout
  report = json.load(open(tmp_path / 'aot.json'))
  assert report['topology'] == TOPOLOGY and report['stages'][0]['fits']
  # A mesh the topology cannot hold is a config error naming the field, before compiling.
  r = run(*base, '--config.mesh.data=1', '--config.mesh.fsdp=8', f'--topology={TOPOLOGY}')
  assert r.returncode == 2 and 'mesh' in r.stderr, r.stderr[-2000:]
