"""Test-wide set-up: 8 simulated CPU devices, so sharding tests see a real mesh, and one
persistent compilation cache for every test process.

`make test` already exports the device flag; setting it here too keeps a bare
``pytest tests/x.py`` equivalent. It must happen before jax creates its CPU backend (conftest
runs first).

The compilation cache: many tests compile the same tiny-model programs (train steps, samplers,
evals), in pytest-xdist workers and in the processes tests start, which inherit these variables.
On 2 cores `make test` took 886-952 s from an empty cache against 1027 s without one, and
612 s when the cache was warm.
``JAX_COMPILATION_CACHE_DIR`` set by the caller wins (empty: off). Runs whose
``train.compilation_cache`` is 'auto' (the default) use this directory too.
"""
import os

_FLAG = '--xla_force_host_platform_device_count'
if _FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + f' {_FLAG}=8').strip()

_CACHE_DIR = os.environ.setdefault(
    'JAX_COMPILATION_CACHE_DIR',
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.pytest_cache',
                 'jax_compilation'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
_CACHE_LIMIT_BYTES = 2 << 30


def _bytes_under(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# Emptied when it outgrows the limit, by the first process only (xdist workers start later and
# share it): entries of old code are never read again.
if (_CACHE_DIR and 'PYTEST_XDIST_WORKER' not in os.environ and os.path.isdir(_CACHE_DIR)
    and _bytes_under(_CACHE_DIR) > _CACHE_LIMIT_BYTES):
  import shutil
  shutil.rmtree(_CACHE_DIR, ignore_errors=True)

import jax  # noqa: E402  (after the environment above)

# A plugin may have imported jax before this file: apply the settings to this process as well.
jax.config.update('jax_compilation_cache_dir', _CACHE_DIR or None)
jax.config.update('jax_persistent_cache_min_compile_time_secs',
                  float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))
