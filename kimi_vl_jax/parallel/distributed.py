"""Multi-host start-up: one call that initializes ``jax.distributed`` from the launcher.

Sources, in order:
1. Explicit environment: ``KVJ_COORDINATOR`` (host:port), ``KVJ_NUM_PROCESSES``,
   ``KVJ_PROCESS_ID`` (set by ``launch/multiprocess_cpu.sh`` and friends).
2. SLURM: ``SLURM_NTASKS`` > 1 (jax's cluster detection reads the rest: the first node of
   ``SLURM_STEP_NODELIST`` is the coordinator, ``SLURM_PROCID`` the process id). With one
   process per GPU (``KVJ_SLURM_MODE=gpu``, the default) jax gives each process the GPU
   ``SLURM_LOCALID``; with one process per node (``KVJ_SLURM_MODE=node``) every GPU of the
   node (``SLURM_GPUS_ON_NODE``) is passed explicitly, since jax would otherwise give the
   single process GPU 0 only.
3. TPU pods: ``KVJ_AUTO_DISTRIBUTED=1`` (or ``TPU_WORKER_HOSTNAMES`` with more than one
   host); jax discovers the topology from the TPU metadata.
Otherwise nothing happens: a single process needs no initialization.

A peer that dies must not leave the survivors hanging. Measured with jax 0.10.2 on CPU
(gloo), ``tests/parallel/test_distributed.py``: when a worker dies, the coordination
service misses its heartbeats and, ``heartbeat_timeout_s`` later, terminates every
survivor with "Terminating process because the JAX distributed service detected fatal
errors. This most likely indicates that another task died" (SIGABRT), even one blocked
inside a collective; when the coordinator (process 0) dies, the survivors see the socket
close and terminate at once. ``initialization_timeout_s`` bounds the wait for peers that
never arrive. A peer that is alive but never joins a collective (stuck in host code)
keeps heartbeating, so nothing above fires: ``Watchdog`` turns such a hang into a clear
error and exit status ``EXIT_HUNG``.

Timeouts can be set by the launcher: ``KVJ_HEARTBEAT_TIMEOUT_S``, ``KVJ_INIT_TIMEOUT_S``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import time
from typing import Callable, Mapping, Optional, TextIO

import jax
from absl import logging


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
  kind: str                      # 'single' | 'explicit' | 'slurm' | 'tpu'
  coordinator: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  cpu_collectives: Optional[str] = None   # 'gloo' for multi-process CPU
  local_device_ids: Optional[tuple] = None  # SLURM one-process-per-node: all the node's GPUs


def detect(env: Optional[Mapping[str, str]] = None) -> DistributedSpec:
  """Reads the launcher's environment; pure (testable without starting anything)."""
  env = os.environ if env is None else env
  if 'KVJ_COORDINATOR' in env:
    try:
      n = int(env['KVJ_NUM_PROCESSES'])
      pid = int(env['KVJ_PROCESS_ID'])
    except KeyError as e:
      raise ValueError(f'KVJ_COORDINATOR is set but {e.args[0]} is missing; the launcher must '
                       'set KVJ_COORDINATOR, KVJ_NUM_PROCESSES and KVJ_PROCESS_ID together') from None
    except ValueError:
      raise ValueError('KVJ_NUM_PROCESSES and KVJ_PROCESS_ID must be integers, got '
                       f'{env.get("KVJ_NUM_PROCESSES")!r}, {env.get("KVJ_PROCESS_ID")!r}') from None
    if not 0 <= pid < n:
      raise ValueError(f'KVJ_PROCESS_ID={pid} is outside [0, KVJ_NUM_PROCESSES={n})')
    return DistributedSpec('explicit', env['KVJ_COORDINATOR'], n, pid,
                           env.get('KVJ_CPU_COLLECTIVES'))
  if int(env.get('SLURM_NTASKS', '1')) > 1:
    mode = env.get('KVJ_SLURM_MODE', 'gpu')
    if mode == 'gpu':
      return DistributedSpec('slurm')
    if mode != 'node':
      raise ValueError(f'KVJ_SLURM_MODE must be gpu or node, got {mode!r}')
    gpus = env.get('SLURM_GPUS_ON_NODE')
    if not gpus or not gpus.isdigit():
      raise ValueError('KVJ_SLURM_MODE=node needs SLURM_GPUS_ON_NODE (submit with '
                       f'--gpus-per-node), got {gpus!r}')
    return DistributedSpec('slurm', local_device_ids=tuple(range(int(gpus))))
  hosts = [h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]
  if env.get('KVJ_AUTO_DISTRIBUTED') == '1' or len(hosts) > 1:
    return DistributedSpec('tpu')
  return DistributedSpec('single')


def initialize(env: Optional[Mapping[str, str]] = None,
               initialization_timeout_s: Optional[int] = None,
               heartbeat_timeout_s: Optional[int] = None) -> DistributedSpec:
  """Initializes jax.distributed if the environment asks for it; no-op on one host.

  Must run before anything touches a JAX backend (``jax.devices()`` etc.).

  Args:
    env: the environment to read (default ``os.environ``).
    initialization_timeout_s: how long to wait for all peers to connect (default
      ``KVJ_INIT_TIMEOUT_S`` or 300).
    heartbeat_timeout_s: a peer silent this long is declared dead and the job fails
      (default ``KVJ_HEARTBEAT_TIMEOUT_S`` or 30).
  """
  env = os.environ if env is None else env
  spec = detect(env)
  if spec.kind == 'single' or jax.distributed.is_initialized():
    return spec  # one host, or already done (a second call is harmless, not an error)
  if initialization_timeout_s is None:
    initialization_timeout_s = _env_seconds(env, 'KVJ_INIT_TIMEOUT_S', 300)
  if heartbeat_timeout_s is None:
    heartbeat_timeout_s = _env_seconds(env, 'KVJ_HEARTBEAT_TIMEOUT_S', 30)
  if spec.cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', spec.cpu_collectives)
  kwargs = dict(initialization_timeout=initialization_timeout_s,
                heartbeat_timeout_seconds=heartbeat_timeout_s)
  if spec.kind == 'explicit':
    kwargs.update(coordinator_address=spec.coordinator, num_processes=spec.num_processes,
                  process_id=spec.process_id)
  if spec.local_device_ids is not None:
    kwargs.update(local_device_ids=list(spec.local_device_ids))
  _initialize_with_supported_kwargs(kwargs)
  logging.info('jax.distributed initialized (%s): process %d of %d', spec.kind,
               jax.process_index(), jax.process_count())
  return spec


def _initialize_with_supported_kwargs(kwargs):
  """jax.distributed.initialize, dropping timeout kwargs an older jax does not know."""
  import inspect
  accepted = inspect.signature(jax.distributed.initialize).parameters
  dropped = [k for k in kwargs if k not in accepted]
  if dropped:
    logging.warning('jax.distributed.initialize does not accept %s; using defaults', dropped)
  jax.distributed.initialize(**{k: v for k, v in kwargs.items() if k in accepted})


def _env_seconds(env: Mapping[str, str], name: str, default: int) -> int:
  raw = env.get(name)
  if raw is None:
    return default
  try:
    value = int(raw)
  except ValueError:
    raise ValueError(f'{name} must be a whole number of seconds, got {raw!r}') from None
  if value < 1:
    raise ValueError(f'{name} must be >= 1, got {value}')
  return value


def is_main_process() -> bool:
  return jax.process_index() == 0


# Exit status of a process that the watchdog ends (EX_TEMPFAIL: a retry may succeed).
EXIT_HUNG = 75


class Watchdog:
  """Ends the process with a clear error when an armed region runs longer than ``timeout_s``.

  A collective waits for every peer; if one is alive but never joins (stuck host code, a
  diverged control flow) nothing else notices. Arm the watchdog around each blocking step:

      watchdog = Watchdog(timeout_s=600)
      with watchdog.arm(f'train step {step}'):
        loss = float(step_fn(...))   # must block: dispatch alone returns at once

  On timeout it writes ``error: <what> did not finish within <t> s on process i of n ...``
  to ``stream`` and calls ``on_timeout(EXIT_HUNG)`` (default ``os._exit``: a thread cannot
  interrupt a main thread blocked in C++, and ``sys.exit`` would wait for it).
  """

  def __init__(self, timeout_s: float, stream: Optional[TextIO] = None,
               on_timeout: Optional[Callable[[int], None]] = None):
    if not timeout_s > 0:
      raise ValueError(f'Watchdog timeout_s must be > 0, got {timeout_s}')
    self.timeout_s = float(timeout_s)
    self._stream = stream
    self._on_timeout = on_timeout if on_timeout is not None else os._exit
    self._cond = threading.Condition()
    self._what: Optional[str] = None
    self._where = ''
    self._deadline = 0.0
    self._generation = 0
    self._thread = threading.Thread(target=self._run, name='kvj-watchdog', daemon=True)
    self._thread.start()

  @contextlib.contextmanager
  def arm(self, what: str):
    # Read here, in the caller's thread: the watchdog thread must not touch the backend.
    where = f'process {jax.process_index()} of {jax.process_count()}'
    with self._cond:
      self._generation += 1
      self._what, self._where = what, where
      self._deadline = time.monotonic() + self.timeout_s
      self._cond.notify()
    try:
      yield
    finally:
      with self._cond:
        self._generation += 1
        self._what = None
        self._cond.notify()

  def _run(self):
    with self._cond:
      while True:
        if self._what is None:
          self._cond.wait()
          continue
        generation, remaining = self._generation, self._deadline - time.monotonic()
        if remaining > 0:
          self._cond.wait(remaining)
          continue
        if generation != self._generation:
          continue
        message = (f'error: {self._what} did not finish within {self.timeout_s:g} s on '
                   f'{self._where}; a peer is probably stuck or dead (exiting instead of hanging)')
        stream = self._stream if self._stream is not None else sys.stderr
        stream.write(message + '\n')
        stream.flush()
        self._what = None
        self._on_timeout(EXIT_HUNG)
