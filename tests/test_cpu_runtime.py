"""cpu_runtime.setup: the step's temp buffer is reused, not re-faulted, on every call.

Runs in fresh processes: the dispatch flag only counts before the CPU client exists, and
the test process's client was created long ago.
"""
import json
import os
import subprocess
import sys

import pytest

from kimi_vl_jax import cpu_runtime

_SCRIPT = r'''
import json, resource, sys
import jax, jax.numpy as jnp
from kimi_vl_jax import cpu_runtime
if sys.argv[1] == 'late':
  jax.devices()                                 # the CPU client exists before setup
done = cpu_runtime.setup()
done['async_flag'] = jax.config.read('jax_cpu_enable_async_dispatch')
done['xla_flags'] = __import__('os').environ.get('XLA_FLAGS', '')
x = jnp.ones((4096, 8192), jnp.float32)        # 128 MiB argument
w = jnp.ones((8192, 16), jnp.float32)
f = jax.jit(lambda x, w: (jnp.sin(x) * x) @ w)  # the sin(x) * x operand is a 128 MiB temp
temp = f.lower(x, w).compile().memory_analysis().temp_size_in_bytes
for _ in range(2):
  f(x, w).block_until_ready()
per_call = []
for _ in range(9):
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x, w).block_until_ready()
  per_call.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
# The median: now and then the heap grows once more (a small block lands next to the freed
# temp buffer), after which the larger heap is reused again.
faults = sorted(per_call)[len(per_call) // 2]
print(json.dumps({'done': done, 'faults_per_call': faults, 'temp_pages': temp / 4096}))
'''


def _run(env_switch: str, when: str = 'early') -> dict:
  # No compilation cache: the process compiles and runs nothing but the measured program.
  env = dict(os.environ, KVJ_CPU_RUNTIME=env_switch, XLA_FLAGS='', JAX_COMPILATION_CACHE_DIR='')
  out = subprocess.run([sys.executable, '-c', _SCRIPT, when], env=env, capture_output=True, text=True,
                       timeout=300, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(cpu_runtime._glibc() is None, reason='mallopt settings are glibc-only')
def test_setup_stops_the_temp_buffer_from_being_faulted_in_every_call():
  on, off = _run('1'), _run('0')
  if on['faults_per_call'] >= 0.1 * on['temp_pages']:
    # Seen once in a full `make test` (every page of every call, never reproduced alone): a
    # heap that cannot grow in place (address-space layout is random per process) makes glibc
    # map the buffer on its own, and such a mapping is returned on free. A fresh process has a
    # fresh layout; a setup that does not work fails both.
    on = _run('1')
  wide = cpu_runtime.has_avx512()
  assert on['done'] == {'sync_dispatch': True, 'retain_freed_memory': True, 'async_flag': False,
                        'vector_width_512': wide,
                        'xla_flags': '--xla_cpu_prefer_vector_width=512' if wide else ''}
  assert off['done']['sync_dispatch'] is False and off['done']['retain_freed_memory'] is False
  assert off['done']['vector_width_512'] is False and off['done']['xla_flags'] == ''
  assert on['temp_pages'] > 30000                     # the program really has a big temp buffer
  # With the settings, a call touches almost no new pages (measured: a few hundred)...
  assert on['faults_per_call'] < 0.1 * on['temp_pages'], on
  # ...without them glibc maps the temp buffer afresh on every call (4 KiB pages; a host whose
  # transparent huge pages are 'always' faults in 2 MiB pages and sees far fewer).
  print('faults per call: with setup', on['faults_per_call'], 'without', off['faults_per_call'],
        'temp pages', on['temp_pages'])


def test_setup_after_the_backend_started_leaves_dispatch_alone():
  late = _run('1', when='late')
  assert late['done']['sync_dispatch'] is False and late['done']['async_flag'] is True
  assert 'already existed' in late['done']['reason']
  # XLA has read its flags by then: setup does not pretend to change them.
  assert late['done']['xla_flags'] == '' and late['done']['vector_width_512'] is False


def test_prefer_wide_vectors_appends_once_and_keeps_an_explicit_width(monkeypatch):
  monkeypatch.setattr(cpu_runtime, 'has_avx512', lambda: True)
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  assert cpu_runtime.prefer_wide_vectors() is True
  assert os.environ['XLA_FLAGS'] == ('--xla_force_host_platform_device_count=8 '
                                     '--xla_cpu_prefer_vector_width=512')
  assert cpu_runtime.prefer_wide_vectors() is False          # already there: not twice
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_prefer_vector_width=256')
  assert cpu_runtime.prefer_wide_vectors() is False
  assert os.environ['XLA_FLAGS'] == '--xla_cpu_prefer_vector_width=256'
  monkeypatch.setattr(cpu_runtime, 'has_avx512', lambda: False)
  monkeypatch.delenv('XLA_FLAGS')
  assert cpu_runtime.prefer_wide_vectors() is False and 'XLA_FLAGS' not in os.environ


def test_request_host_devices_sets_the_count_once_and_respects_an_explicit_one(monkeypatch):
  monkeypatch.setattr(cpu_runtime, '_backends_started', lambda: False)
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_prefer_vector_width=512')
  assert cpu_runtime.request_host_devices(2) == 2
  assert os.environ['XLA_FLAGS'] == ('--xla_cpu_prefer_vector_width=512 '
                                     '--xla_force_host_platform_device_count=2')
  assert cpu_runtime.request_host_devices(4) == 2            # already set: kept
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  assert cpu_runtime.request_host_devices(2) == 8
  monkeypatch.delenv('XLA_FLAGS')
  assert cpu_runtime.request_host_devices(1) == 1 and 'XLA_FLAGS' not in os.environ
  monkeypatch.setattr(cpu_runtime, '_backends_started', lambda: True)
  assert cpu_runtime.request_host_devices(2) == 1 and 'XLA_FLAGS' not in os.environ
