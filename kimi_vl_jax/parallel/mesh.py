"""Build the device mesh over (data, fsdp, expert, tensor) from config sizes."""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from kimi_vl_jax.config.validate import MESH_AXES, resolve_mesh_shape


def build_mesh(mesh_cfg, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A Mesh with axes ``MESH_AXES`` whose sizes come from ``mesh_cfg`` (-1 = the rest).

  Uses ``jax.experimental.mesh_utils`` so that, on TPU/GPU, inner axes (tensor,
  expert) land on the fastest interconnect; on CPU and across processes it falls back
  to a process-major device order, so each host's devices stay contiguous on the
  outer (data) axis.
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = resolve_mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    from jax.experimental import mesh_utils
    if jax.process_count() > 1:
      grid = _process_major(devices, shape)
    else:
      grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    grid = _process_major(devices, shape)
  return Mesh(grid, MESH_AXES)


def _process_major(devices, shape):
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  return np.asarray(ordered, dtype=object).reshape(shape)


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in ('data', 'fsdp', 'expert')]))
