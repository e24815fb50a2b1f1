"""build_mesh: axis names and order, -1 resolution, device coverage, errors naming the key."""
import jax
import ml_collections
import numpy as np
import pytest

from kimi_vl_jax.config import ConfigError
from kimi_vl_jax.parallel.mesh import build_mesh, data_parallel_size


def _cfg(**sizes):
  base = dict(data=1, fsdp=1, expert=1, tensor=1)
  base.update(sizes)
  return ml_collections.ConfigDict(base)


@pytest.fixture(scope='module', autouse=True)
def _eight_devices():
  assert jax.device_count() == 8, 'tests run with 8 simulated CPU devices (see tests/conftest.py)'


@pytest.mark.parametrize('sizes,shape,dp', [
    (dict(data=-1), (8, 1, 1, 1), 8),
    (dict(data=2, fsdp=2, tensor=2), (2, 2, 1, 2), 4),
    (dict(expert=4, fsdp=-1), (1, 2, 4, 1), 8),
    (dict(data=-1, tensor=4), (2, 1, 1, 4), 2),
    (dict(data=1, fsdp=-1, expert=2, tensor=2), (1, 2, 2, 2), 4),
])
def test_axis_sizes_and_free_axis(sizes, shape, dp):
  mesh = build_mesh(_cfg(**sizes))
  assert mesh.axis_names == ('data', 'fsdp', 'expert', 'tensor')
  assert mesh.devices.shape == shape
  assert data_parallel_size(mesh) == dp
  # Every device appears exactly once.
  ids = sorted(d.id for d in mesh.devices.flat)
  assert ids == sorted(d.id for d in jax.devices())


def test_explicit_device_subset():
  devices = jax.devices()[:4]
  mesh = build_mesh(_cfg(data=-1, tensor=2), devices=devices)
  assert mesh.devices.shape == (2, 1, 1, 2)
  assert {d.id for d in mesh.devices.flat} == {d.id for d in devices}


@pytest.mark.parametrize('sizes,key', [
    (dict(data=3), r'^config\.mesh: axis sizes .* multiply to 3, but there are 8 devices'),
    (dict(data=-1, fsdp=3), r'^config\.mesh\.data: the fixed axes use 3 devices'),
    (dict(data=-1, tensor=-1), r'^config\.mesh\.tensor: only one axis may be -1'),
    (dict(data=-2), r'^config\.mesh\.data: must be a positive integer or -1'),
])
def test_bad_sizes_name_the_key(sizes, key):
  with pytest.raises(ConfigError, match=key):
    build_mesh(_cfg(**sizes))


def test_process_major_order_keeps_hosts_contiguous():
  """The multi-process fallback orders devices by (process, id) along the outer axes."""
  from kimi_vl_jax.parallel.mesh import _process_major

  class FakeDevice:
    def __init__(self, pid, i):
      self.process_index, self.id = pid, i

  devices = [FakeDevice(p, p * 4 + i) for i in range(4) for p in (1, 0)]  # interleaved on purpose
  grid = _process_major(devices, (2, 1, 2, 2))
  assert [d.process_index for d in grid[0].flat] == [0] * 4
  assert [d.process_index for d in grid[1].flat] == [1] * 4
  assert np.all(np.diff([d.id for d in grid[0].flat]) > 0)


def test_target_platform_follows_the_ambient_mesh():
  # Compiling ahead of time for TPU devices from a CPU host: per-platform choices must follow
  # the mesh's devices, not the host's default backend.
  from jax._src import mesh as mesh_internal   # AbstractDevice: a device kind without devices
  from jax.sharding import AbstractMesh, AxisType
  from kimi_vl_jax.ops import attention, moe_dispatch
  from kimi_vl_jax.parallel.mesh import target_platform
  assert target_platform() == jax.default_backend()
  tpu = AbstractMesh((2,), ('data',), axis_types=(AxisType.Auto,),
                     abstract_device=mesh_internal.AbstractDevice('TPU v5', None, 'tpu'))
  with jax.sharding.use_abstract_mesh(tpu):
    assert target_platform() == 'tpu'
    assert attention.resolve_backend('auto') == 'splash'
    assert moe_dispatch.resolve_backend('auto') == 'ragged'
  if jax.default_backend() == 'cpu':
    assert attention.resolve_backend('auto') == 'xla'
    assert moe_dispatch.resolve_backend('auto') == 'capacity'
