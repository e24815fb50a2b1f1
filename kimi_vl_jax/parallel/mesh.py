"""Build the device mesh over (data, fsdp, expert, tensor) from config sizes."""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from kimi_vl_jax.config.validate import MESH_AXES, resolve_mesh_shape


def build_mesh(mesh_cfg, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A Mesh with axes ``MESH_AXES`` whose sizes come from ``mesh_cfg`` (-1 = the rest).

  On TPU, ``jax.experimental.mesh_utils`` lays the axes onto the physical topology so that
  inner axes (tensor, expert) land on the fastest interconnect. Elsewhere (CPU, GPU
  clusters, whose topology mesh_utils does not model across hosts) devices are taken in
  process-major order, so each host's devices stay contiguous on the outer (data) axis.
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = resolve_mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  if devices[0].platform == 'tpu':
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  else:
    grid = _process_major(devices, shape)
  return Mesh(grid, MESH_AXES)


def _process_major(devices, shape):
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  return np.asarray(ordered, dtype=object).reshape(shape)


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in ('data', 'fsdp', 'expert')]))


def target_platform() -> str:
  """The platform the code being traced will run on: the ambient mesh's (``jax.set_mesh``),
  else the default backend's. They differ when a program is compiled ahead of time for other
  devices (a TPU topology from a CPU host), and per-platform choices (attention and MoE
  backends) must follow the devices that run the program."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is not None and not mesh.empty:
    device = getattr(mesh, 'abstract_device', None)
    if device is not None and getattr(device, 'platform', None):
      return device.platform
  return jax.default_backend()
