"""Host settings for training on XLA:CPU: run programs on the calling thread, keep freed memory.

Why. XLA:CPU allocates each execution's temporaries as one buffer (872 MB for the step of
``python -m kimi_vl_jax.bench.lm``) with ``posix_memalign`` and frees it when the execution
ends. With async dispatch the execution, and so the allocation, happens on a worker thread,
and glibc serves a worker thread's request above its 64 MB per-thread heap with a fresh
``mmap`` and returns it with ``munmap``. Every step then first-touches the whole buffer again.
Measured on that step (jax 0.10.2, 2 cores): 170K page faults and 0.35 s of kernel time in a
1.25 s step.

What ``setup`` does (call it before anything else touches JAX, and after
``jax.distributed.initialize``):

1. ``jax_cpu_enable_async_dispatch = False``: a single-device CPU program runs on the thread
   that calls it, whose allocations come from glibc's main arena. (Multi-device programs are
   still spread over worker threads by the runtime.) Only the CPU client reads this flag.
2. When the default backend is the CPU and the C library is glibc: ``mallopt`` with
   ``M_MMAP_MAX = 0`` (large blocks come from the heap, not from fresh mappings) and
   ``M_TRIM_THRESHOLD = 2 GiB`` (free memory at the top of the heap is kept up to that much), so
   the next step reuses the pages the last one touched. Measured: 2.4K faults, 0.03 s of
   kernel time, 1.08 s a step. Accelerator hosts are left alone: there the big buffers live on
   the device and the host's allocator should keep returning memory.

3. On hosts whose CPU has AVX-512, ``--xla_cpu_prefer_vector_width=512`` is appended to
   ``XLA_FLAGS`` (unless it names a width already): XLA:CPU emits 256-bit vector code by
   default, and the elementwise passes over attention tiles run faster at 512 bits
   (``python -m kimi_vl_jax.bench.vision``, same sitting: 777 / 772 vs 806 / 790 ms a step).
   The flag only affects CPU compilation, so accelerator hosts are unaffected by it.

``KVJ_CPU_RUNTIME=0`` in the environment turns all of it off (``setup`` then reports what it left).
"""
from __future__ import annotations

import ctypes
import os
from typing import Optional

import jax

M_TRIM_THRESHOLD = -1      # glibc malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 2 ** 31 - 1   # mallopt takes an int
ENV_SWITCH = 'KVJ_CPU_RUNTIME'
VECTOR_WIDTH_FLAG = 'xla_cpu_prefer_vector_width'


def _glibc() -> Optional[ctypes.CDLL]:
  """The process's C library when it is glibc (it has ``gnu_get_libc_version``), else None."""
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # noqa: B018  (AttributeError on musl, macOS, ...)
    return libc
  except (OSError, AttributeError):
    return None


def retain_freed_memory() -> bool:
  """Tells glibc to serve large blocks from the heap and keep freed memory (see module doc).

  Returns whether both settings were accepted (False when the C library is not glibc).
  """
  libc = _glibc()
  if libc is None:
    return False
  return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(
      libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def has_avx512() -> bool:
  """Whether this host's CPU reports AVX-512F (Linux ``/proc/cpuinfo``; False elsewhere)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('flags'):
          return 'avx512f' in line.split()
  except OSError:
    pass
  return False


def prefer_wide_vectors() -> bool:
  """Appends ``--xla_cpu_prefer_vector_width=512`` to ``XLA_FLAGS`` on AVX-512 hosts.

  Leaves ``XLA_FLAGS`` alone when it already names a width. Returns whether it appended.
  Only effective before the first backend starts.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  if VECTOR_WIDTH_FLAG in flags or not has_avx512():
    return False
  os.environ['XLA_FLAGS'] = f'{flags} --{VECTOR_WIDTH_FLAG}=512'.strip()
  return True


HOST_DEVICES_FLAG = 'xla_force_host_platform_device_count'


def request_host_devices(count: int) -> int:
  """Asks XLA:CPU for ``count`` host devices (``--xla_force_host_platform_device_count``).

  Why: one XLA:CPU device runs a program's small dots and loop bodies on one thread, so on a
  multi-core host a data-parallel program over one device per core keeps every core busy
  (``python -m kimi_vl_jax.bench.vision``). Leaves ``XLA_FLAGS`` alone when it already sets
  the count, and does nothing once a backend has started (the flag is read at start).
  Returns the count in effect from ``XLA_FLAGS`` (1 when unset).
  """
  flags = os.environ.get('XLA_FLAGS', '')
  if HOST_DEVICES_FLAG not in flags and count > 1 and not _backends_started():
    flags = f'{flags} --{HOST_DEVICES_FLAG}={count}'.strip()
    os.environ['XLA_FLAGS'] = flags
  for token in flags.split():
    if token.lstrip('-').startswith(HOST_DEVICES_FLAG + '='):
      return int(token.split('=', 1)[1])
  return 1


def setup() -> dict:
  """Applies the settings of the module doc; returns what was done (for the log).

  Must run before the first computation: the CPU client reads the dispatch flag when it is
  created. It is idempotent.
  """
  if os.environ.get(ENV_SWITCH, '1') == '0':
    return {'sync_dispatch': False, 'retain_freed_memory': False, 'vector_width_512': False,
            'reason': f'{ENV_SWITCH}=0'}
  started = _backends_started()
  if not started:
    jax.config.update('jax_cpu_enable_async_dispatch', False)
    prefer_wide_vectors()   # XLA reads XLA_FLAGS when the first backend starts
  on_cpu = jax.default_backend() == 'cpu'
  done = {'sync_dispatch': not started and on_cpu,
          'retain_freed_memory': on_cpu and retain_freed_memory(),
          'vector_width_512': f'{VECTOR_WIDTH_FLAG}=512' in os.environ.get('XLA_FLAGS', '')}
  if started:
    done['reason'] = 'the CPU client already existed; dispatch stays as it was'
  return done


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):   # private API moved: assume the worst (no flag flip)
    return True
