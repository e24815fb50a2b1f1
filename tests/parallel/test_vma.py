"""vary_like / varying_axes: no-ops outside shard_map, union of the references' axes inside."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from kimi_vl_jax.parallel.vma import vary_like, varying_axes


def test_outside_shard_map_nothing_varies():
  x = jnp.ones(3)
  assert varying_axes(x) == frozenset()
  assert vary_like(x, jnp.zeros(2)) is x


def test_inside_shard_map_a_constant_takes_the_union_of_the_references():
  if jax.device_count() < 4:
    pytest.skip('needs 4 (simulated) devices')
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ('a', 'b'))
  seen = {}

  def body(xa, xb):
    c = jnp.zeros(())
    seen['before'] = varying_axes(c)
    seen['after'] = varying_axes(vary_like(c, xa, xb))
    seen['ref'] = varying_axes(xa)
    return xa

  jax.shard_map(body, mesh=mesh, in_specs=(P('a'), P('b')), out_specs=P('a'))(
      jnp.ones(4), jnp.ones(4))
  assert seen == {'before': frozenset(), 'after': frozenset({'a', 'b'}), 'ref': frozenset({'a'})}
