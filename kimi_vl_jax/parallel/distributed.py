"""Multi-host start-up: one call that initializes ``jax.distributed`` from the launcher.

Sources, in order:
1. Explicit environment: ``KVJ_COORDINATOR`` (host:port), ``KVJ_NUM_PROCESSES``,
   ``KVJ_PROCESS_ID`` (set by ``launch/multiprocess_cpu.sh`` and friends).
2. SLURM: ``SLURM_NTASKS`` > 1 (jax's cluster detection reads the rest: the first node of
   ``SLURM_JOB_NODELIST`` is the coordinator, ``SLURM_PROCID`` the process id).
3. TPU pods: ``KVJ_AUTO_DISTRIBUTED=1`` (or ``TPU_WORKER_HOSTNAMES`` with more than one
   host); jax discovers the topology from the TPU metadata.
Otherwise nothing happens: a single process needs no initialization.

A peer that dies must not leave the survivors hanging: the heartbeat timeout makes the
coordination service fail the job within ``heartbeat_timeout_s``, and
``initialization_timeout_s`` bounds the wait for peers that never arrive.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Optional

import jax
from absl import logging


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
  kind: str                      # 'single' | 'explicit' | 'slurm' | 'tpu'
  coordinator: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  cpu_collectives: Optional[str] = None   # 'gloo' for multi-process CPU


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
    return DistributedSpec('slurm')
  hosts = [h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]
  if env.get('KVJ_AUTO_DISTRIBUTED') == '1' or len(hosts) > 1:
    return DistributedSpec('tpu')
  return DistributedSpec('single')


def initialize(env: Optional[Mapping[str, str]] = None,
               initialization_timeout_s: int = 300,
               heartbeat_timeout_s: int = 30) -> DistributedSpec:
  """Initializes jax.distributed if the environment asks for it; no-op on one host.

  Must run before anything touches a JAX backend (``jax.devices()`` etc.).
  """
  spec = detect(env)
  if spec.kind == 'single':
    return spec
  if spec.cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', spec.cpu_collectives)
  kwargs = dict(initialization_timeout=initialization_timeout_s,
                heartbeat_timeout_seconds=heartbeat_timeout_s)
  if spec.kind == 'explicit':
    kwargs.update(coordinator_address=spec.coordinator, num_processes=spec.num_processes,
                  process_id=spec.process_id)
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


def is_main_process() -> bool:
  return jax.process_index() == 0
